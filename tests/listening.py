"""A broker run as a child process for the tests: started, waited for, stopped by its PID."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from edgefed.transport.broker import port_open


@contextlib.contextmanager
def listening(
    command: list[str],
    port: int,
    *,
    log: Path,
    start_timeout_s: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    group: bool = False,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` for the block, from when something answers on 127.0.0.1:``port``.

    Its output goes to ``log``. It is stopped with SIGTERM, then SIGKILL after 20 s; with
    ``group``, the whole process group it leads (a server started by a script).

    Raises:
        RuntimeError: it exited, or did not listen within ``start_timeout_s``.
    """
    with log.open("wb") as out:
        server = subprocess.Popen(
            command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=group,
        )  # fmt: skip

    def stop(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(server.pid, sig)
            else:
                server.send_signal(sig)

    try:
        deadline = time.monotonic() + start_timeout_s
        while not port_open("127.0.0.1", port):
            if server.poll() is not None or time.monotonic() > deadline:
                text = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{command[0]} did not listen on {port}:\n{text}")
            time.sleep(0.05)
        yield server
    finally:
        stop(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            stop(signal.SIGKILL)
            server.wait()
