"""Where a device's fits run: its GPU when it has one and the method trains there, else the CPU.

``device = "auto"`` (the default) takes the first CUDA device torch sees, so a Jetson or a
laptop with a GPU uses it without a setting; ``cpu`` keeps everything on the CPU; ``cuda``
insists, and an agent whose torch sees no CUDA device stops at start saying so.
"""

from __future__ import annotations

import logging
from typing import Final

import torch

from edge_agent.config import DeviceChoice
from schemas.errors import ConfigError
from schemas.messages import Method

log = logging.getLogger(__name__)

GPU_METHODS: Final[frozenset[Method]] = frozenset({"lora", "kd"})
"""Methods whose trainers keep every tensor on the model's device. Forward gradients and
split learning build their perturbations and exchanged activations on the CPU, so they
train there whatever the setting (the agent logs it once)."""

_told: set[Method] = set()


def resolve_device(choice: DeviceChoice) -> str:
    """The torch device ``choice`` names on this machine: ``cuda`` or ``cpu``.

    Raises:
        ConfigError: ``cuda`` was asked for and torch sees no CUDA device.
    """
    if choice == "cpu":
        return "cpu"
    available = torch.cuda.is_available()
    if choice == "cuda" and not available:
        raise ConfigError(
            "device = 'cuda', but torch sees no CUDA device (torch.cuda.is_available() is "
            "False): install torch built for this GPU (JetPack's wheel on a Jetson) or set "
            "device = 'auto' or 'cpu'"
        )
    return "cuda" if available else "cpu"


def fit_device(device: str, method: Method) -> str:
    """Where ``method`` trains on a device whose resolved device is ``device``."""
    if device == "cpu" or method in GPU_METHODS:
        return device
    if method not in _told:
        _told.add(method)
        log.info("%s trains on the CPU: its trainer keeps tensors there, not on %s", method, device)
    return "cpu"
