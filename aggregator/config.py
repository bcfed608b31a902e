"""Settings of the aggregator service, read from ``aggregator.toml``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgefed.config import Settings
from schemas.messages import LoraSpec, Method, ModelRef, TrainSpec

StrategyName = Literal["fedasync", "fedbuff"]
StalenessName = Literal["constant", "polynomial", "hinge", "inverse_sqrt"]


class StrategySettings(Settings):
    """Which merge rule runs and with what parameters (DESIGN §5)."""

    name: StrategyName = "fedbuff"
    staleness: StalenessName | None = None
    """None picks the strategy's own default (FedAsync: polynomial, FedBuff: inverse_sqrt)."""
    staleness_params: dict[str, float] = Field(default_factory=dict)
    alpha: float = Field(default=0.6, gt=0, le=1)
    buffer_size: int = Field(default=3, gt=0)
    server_lr: float = Field(default=1.0, gt=0)


class AggregatorConfig(Settings):
    """Everything one aggregator needs to run a federation."""

    federation: str
    task_id: str = "task-1"
    method: Method = "lora"
    model: ModelRef = ModelRef(name="tiny")
    lora: LoraSpec = LoraSpec()
    train: TrainSpec = TrainSpec()
    strategy: StrategySettings = StrategySettings()
    seed: int = 0
    """Seed of the shared base model and adapter initialisation."""
    max_staleness: int = Field(default=10, ge=0)
    max_update_norm: float | None = Field(default=None, gt=0)
    norm_action: Literal["clip", "reject"] = "clip"
    eval_data: str = "synthetic:n=256,seed=999"
    eval_every: int = Field(default=1, ge=1)
    max_versions: int = Field(default=0, ge=0)
    """Stop after this many versions (0 = run until stopped)."""
    max_payload: int = Field(default=256 * 1024, ge=4096)
