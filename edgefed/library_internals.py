"""Every use of a library's non-public attributes, in one place.

edgefed uses public APIs wherever a library offers one. The few below have no public
equivalent in the locked releases. Each function looks its attribute up here and raises
:class:`~schemas.errors.IncompatibleLibrary`, naming the package and its installed
version, when a release has dropped it; ``tests/edgefed/test_library_internals.py`` calls
every one, so ``make test-latest`` shows such a release at once, by name, rather than as
a failure deep inside a run.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import cast

import torch
from transformers import PretrainedConfig

from schemas.errors import IncompatibleLibrary


def _attribute(owner: object, name: str, *, package: str) -> object:
    try:
        return getattr(owner, name)
    except (AttributeError, RuntimeError) as exc:  # torch.ops raises RuntimeError too
        raise IncompatibleLibrary(package, f"{type(owner).__name__}.{name}") from exc


def _method(owner: object, name: str, *, package: str) -> Callable[[], object]:
    found = _attribute(owner, name, package=package)
    if not callable(found):
        raise IncompatibleLibrary(package, f"a callable {type(owner).__name__}.{name}")
    return cast("Callable[[], object]", found)


def _paho_client(client: object) -> object:
    """The paho client inside an ``aiomqtt.Client``, which aiomqtt keeps private."""
    return _attribute(client, "_client", package="aiomqtt")


def mqtt_socket(client: object) -> socket.socket | None:
    """The socket under an ``aiomqtt.Client``'s connection, or None while it has none.

    Fault injection shuts it down to drop a link as a crash or a lost network would:
    neither aiomqtt nor paho offers a way to drop a connection without DISCONNECT.
    """
    sock = _method(_paho_client(client), "socket", package="paho-mqtt")()
    return sock if isinstance(sock, socket.socket) else None


def close_mqtt_socket(client: object) -> None:
    """Close the socket an ``aiomqtt.Client`` leaves open after a failed connection attempt.

    paho's ``_sock_close`` also tells aiomqtt to stop watching the socket, so closing it
    this way never leaves a dead descriptor registered with the event loop.
    """
    _method(_paho_client(client), "_sock_close", package="paho-mqtt")()


def attention_implementation(config: PretrainedConfig) -> str | None:
    """The attention implementation a transformers config selects (None: not chosen yet).

    Setting it has public ways (``attn_implementation=`` and ``set_attn_implementation``);
    reading it has only this attribute, which transformers' own documentation uses.
    """
    found = _attribute(config, "_attn_implementation", package="transformers")
    return found if isinstance(found, str) else None


def cpu_bf16_native() -> bool:
    """OneDNN's own check for native bf16 on this CPU (AVX-512 BF16 or AMX).

    torch's public ``torch.cpu`` and ``torch.backends`` say which vector unit runs, not
    whether bf16 matrix products are native or emulated.
    """
    mkldnn = _attribute(torch.ops, "mkldnn", package="torch")
    return bool(_method(mkldnn, "_is_mkldnn_bf16_supported", package="torch")())
