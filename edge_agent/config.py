"""Settings of one edge agent, read from ``agent.toml`` and the command line."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from edgefed.ml.privacy import PrivacySettings
from edgefed.settings import CommandSettings
from edgefed.transport.connection import MqttSettings
from schemas.messages import DeviceProfile, Method, ModelRef

DeviceChoice = Literal["auto", "cpu", "cuda"]
"""Where an agent's fits run (``edge_agent.device``)."""


class AgentConfig(CommandSettings):
    """Everything one device needs to take part in a federation."""

    federation: str
    client_id: str
    data: str
    """Where the local training data is: a file, or ``synthetic:n=...,seed=...``."""
    profile: DeviceProfile = DeviceProfile()
    seed: int = 0
    """Seed of this device's local batch order."""
    slowdown: float = Field(default=1.0, ge=1.0)
    """Emulates a slower device: after each fit, wait (slowdown - 1) x the fit's compute time."""
    once_per_version: bool = False
    """After an accepted update, wait for the next global version before training again
    (classic FedAvg), instead of training on as soon as the ack arrives. An aggregator with
    a ``[sync]`` table names each round's devices in its task, and the agent then does this
    (and trains only in rounds it is picked for) without being told."""
    max_updates: int = Field(default=0, ge=0)
    """Stop after this many answered updates (0 = run until stopped)."""
    ack_timeout_s: float = Field(default=30.0, gt=0)
    """Re-send an unanswered update (same update_id, so never merged twice) after this long."""
    ask_after_s: float = Field(default=5.0, gt=0)
    """Seconds without the task, or without the global it names, before asking the aggregator
    for it (a broker that lost or never keeps retained messages); the pause then doubles."""
    max_resends: int = Field(default=5, ge=0)
    state_dir: str | None = None
    """Folder of the durable outbox: updates wait there, across restarts, until acked.

    With it, ``max_updates`` counts answers across restarts too. None keeps nothing on disk.
    """
    max_payload: int = Field(default=256 * 1024, ge=4096)
    method: Method | None = None
    """Train with this method instead of the task's; any method whose result is a delta of
    the same adapter (lora, fwdgrad) may mix in one federation if the aggregator accepts it."""
    model: ModelRef | None = None
    """``kd`` only: run this model instead of the task's (same vocabulary, any size); the
    device shares logits, never adapter weights, so the shapes need not match."""
    trainer: dict[str, bool | int | float | str] = Field(default_factory=dict)
    """Method-specific trainer options (e.g. optimizer, grad_clip for lora; mode, lr for
    fwdgrad), checked against the trainers' own options when the config is loaded."""
    mqtt: MqttSettings = MqttSettings()
    """Broker URL, TLS files and identity (the ``[mqtt]`` table); secrets only from files/env."""
    trusted_global_keys: tuple[str, ...] = ()
    """PEM Ed25519 public keys of the aggregator: with any, only globals and tasks signed by one
    of them are followed (unsigned or wrongly signed ones are refused). Empty: no check."""
    budget_from_os: bool = False
    """Without ``profile.memory_budget_mb``, plan against the memory the OS has free;
    with neither, the task's method and shape are used as they are.

    See docs/architecture.md §7.
    """
    device: DeviceChoice = "auto"
    """Where fits run: ``auto`` (the first CUDA device when torch sees one, else the CPU),
    ``cpu``, or ``cuda`` (an error at start without one). LoRA and KD train on the GPU;
    forward gradients and split learning stay on the CPU (see ``edge_agent.device``). The
    planner then measures and budgets the GPU's memory."""
    torch_threads: int | None = Field(default=None, ge=1)
    """Threads torch's CPU kernels may use (the agent sets it at start); None keeps torch's
    default, every core. One thread each is best when several agents share a host's cores."""
    shared_process: bool = False
    """Other agents share this process (the simulator): its memory cannot be told apart, so
    the agent plans as a process of its own would and does not measure its steps."""
    privacy: PrivacySettings | None = None
    """Local differential privacy: clip each update and add Gaussian noise on the device."""

    @model_validator(mode="after")
    def _trainer_options_fit(self) -> AgentConfig:
        """A misspelt or mistyped trainer option fails at load, not when the first task comes."""
        if self.trainer:
            # Imported only here: the trainers import torch, which `edgefed plan` avoids.
            from edge_agent.trainers import check_trainer_options  # noqa: PLC0415

            check_trainer_options(self.method, self.trainer)
        return self
