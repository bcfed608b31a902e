"""``edgefed credentials rotate-signing-key``: devices trust old and new keys, then new only."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from aggregator.config import AggregatorConfig
from edge_agent.config import AgentConfig
from edgefed.cli.main import main
from edgefed.security.credentials import CredentialsDir
from edgefed.security.signing import GlobalSigner, GlobalVerifier
from edgefed.settings import load_settings
from schemas.errors import SignatureError
from schemas.messages import GlobalModel, ModelRef, Task

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd is not installed"
)


def _cli(root: Path, action: str, *extra: str) -> int:
    return main(["credentials", action, "--dir", str(root), *extra])


def _agent(layout: CredentialsDir, device: str) -> AgentConfig:
    path = layout.identity(device) / "connection.toml"
    return load_settings(AgentConfig, path, federation="f", client_id=device, data="x")


def _signed_task(key_file: Path) -> Task:
    task = Task(task_id="t", federation="f", version=2, model=ModelRef(name="tiny"))
    return GlobalSigner.from_file(key_file).sign(task, federation="f")


def _accepts(layout: CredentialsDir, device: str, message: Task | GlobalModel) -> bool:
    verifier = GlobalVerifier.from_files(_agent(layout, device).trusted_global_keys)
    try:
        verifier.verify(message, federation="f")
    except SignatureError:
        return False
    return True


def test_signing_rotation_keeps_the_old_key_trusted_until_finish(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "d"
    assert main(["credentials", "init", "--dir", str(root), "--broker-host", "b.example"]) == 0
    assert _cli(root, "add-device", "pi-01") == 0
    layout = CredentialsDir(root)
    aggregator_dir = layout.identity("aggregator")
    old_key = tmp_path / "old.key"
    shutil.copyfile(aggregator_dir / "global.key", old_key)
    old_task = _signed_task(old_key)
    capsys.readouterr()

    assert _cli(root, "rotate-signing-key") == 0
    printed = capsys.readouterr().out
    aggregator = load_settings(AggregatorConfig, aggregator_dir / "connection.toml", federation="f")
    assert aggregator.signing_key == str(aggregator_dir / "global.key")
    new_pem = Path(aggregator.signing_key).read_bytes()
    assert new_pem != old_key.read_bytes()
    assert (layout.signing / "global.key").read_bytes() == new_pem
    assert "PRIVATE KEY" not in printed and new_pem.decode() not in printed
    for secret in (aggregator_dir / "global.key", layout.signing / "global.key"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    new_task = _signed_task(Path(aggregator.signing_key))
    new_global = GlobalSigner.from_file(aggregator.signing_key).sign(
        GlobalModel(task_id="t", version=1, tensors={}), federation="f"
    )
    # Grace period: devices, including one added meanwhile, accept both keys.
    assert _cli(root, "add-device", "pi-02") == 0
    for device in ("pi-01", "pi-02"):
        assert len(_agent(layout, device).trusted_global_keys) == 2
        assert _accepts(layout, device, old_task)
        assert _accepts(layout, device, new_task)
        assert _accepts(layout, device, new_global)
    assert _cli(root, "rotate-signing-key") == 1  # a second rotation would drop a live key
    assert (layout.signing / "global.key").read_bytes() == new_pem

    assert _cli(root, "rotate-signing-key", "--finish") == 0
    for device in ("pi-01", "pi-02"):
        assert _agent(layout, device).trusted_global_keys == (
            str(layout.identity(device) / "global.pub"),
        )
        assert not _accepts(layout, device, old_task)
        assert _accepts(layout, device, new_task)
    assert not layout.previous_public_key.exists()
    assert _cli(root, "rotate-signing-key", "--finish") == 1  # nothing under way


def test_signing_rotation_refuses_a_folder_without_credentials(tmp_path: Path) -> None:
    assert _cli(tmp_path, "rotate-signing-key") == 1
