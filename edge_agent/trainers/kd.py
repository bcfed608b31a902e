"""KD-FedLLM on the device: train locally, then answer with top-k logits on a proxy slice.

The device may run a different model than the global one, as long as the vocabulary
matches (docs/architecture.md §6 ``kd``): what it shares is logits on public rows, whose size is
``positions x k`` whatever the model. Its adapter therefore stays on the device and
carries over between rounds; the global adapter it is handed is not its own shape in
general and is ignored.
"""

from __future__ import annotations

import time
from typing import ClassVar, Literal

from peft import PeftModel
from pydantic import Field

from edge_agent.trainers.base import FitResult
from edge_agent.trainers.fwdgrad import FwdGradTrainer
from edge_agent.trainers.lora import LoraTrainer
from edgefed.data.kd_proxy import load_proxy, proxy_logits, top_k
from edgefed.ml.models import get_adapter, set_adapter
from edgefed.ml.tokens import TokenDataset
from edgefed.settings import Settings
from schemas.errors import ConfigError
from schemas.messages import Method, ModelRef, ProxySpec, TensorMap, TrainSpec


class KdConfig(Settings):
    """How a KD device trains and what it uploads.

    Attributes:
        local: Local training method: ``lora`` (backprop, default) or ``fwdgrad`` where
            backprop does not fit in memory.
        top_k: Logits per position to upload; None uses the task's ``ProxySpec.top_k``
            (the aggregator nacks any other width).
    """

    local: Literal["lora", "fwdgrad"] = "lora"
    top_k: int | None = Field(default=None, ge=1)


class KdTrainer:
    """Local training plus logits on the task's proxy slice (set with :meth:`use_proxy`)."""

    method: ClassVar[Method] = "kd"

    def __init__(self, model: PeftModel, config: KdConfig | None = None) -> None:
        """Wrap ``model`` (the device's own, from ``attach_lora``) and its local trainer."""
        self.model = model
        self.config = config or KdConfig()
        self._local: LoraTrainer | FwdGradTrainer = (
            LoraTrainer(model) if self.config.local == "lora" else FwdGradTrainer(model)
        )
        self._adapter: TensorMap = get_adapter(model)
        """The device's own adapter, carried from round to round."""
        self._proxy: tuple[ProxySpec, TokenDataset] | None = None

    @property
    def adapter(self) -> TensorMap:
        """The device's adapter after the last fit."""
        return self._adapter

    def use_proxy(self, spec: ProxySpec, *, seq_len: int, model: ModelRef) -> None:
        """Answer the next fits on the slice ``spec`` names (loaded once per source).

        Raises:
            ConfigError: The slice cannot be loaded.
        """
        if self._proxy is None or self._proxy[0] != spec:
            self._proxy = (spec, load_proxy(spec, seq_len=seq_len, model=model))

    def fit(
        self, global_adapter: TensorMap, data: TokenDataset, spec: TrainSpec, *, seed: int
    ) -> FitResult:
        """Train the device's own adapter on ``data``, then take logits on the proxy slice.

        ``global_adapter`` is ignored: the global model may have another shape, and the
        knowledge flows back through distillation only.

        Raises:
            ConfigError: No proxy slice was set.
        """
        del global_adapter
        if self._proxy is None:
            raise ConfigError("a kd fit needs a proxy slice: the task announced none")
        proxy, proxy_data = self._proxy
        started = time.perf_counter()
        local = self._local.fit(self._adapter, data, spec, seed=seed)
        self._adapter = {name: t + local.delta[name] for name, t in self._adapter.items()}
        set_adapter(self.model, self._adapter)
        logits = top_k(proxy_logits(self.model, proxy_data), self.config.top_k or proxy.top_k)
        return FitResult(
            delta={},
            num_samples=local.num_samples,
            train_loss=local.train_loss,
            compute_s=time.perf_counter() - started,
            steps=local.steps,
            diverged=local.diverged,
            logits=logits,
            proxy_slice=proxy.slice_id,
        )
