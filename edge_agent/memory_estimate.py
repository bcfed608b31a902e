"""Peak memory of one local training step, estimated from the model's config.

The estimate is the process's peak resident memory while a trainer runs one step, as a sum
of named parts so an operator can see where the memory goes:

- ``runtime``: what the process holds before the model is built (interpreter, torch,
  transformers, peft, MQTT client). Measured on the device (its current RSS) when it plans
  for itself; :data:`RUNTIME_MB` when planning offline.
- ``weights``: every base-model parameter, ``P x bytes(dtype)``.
- ``adapter``: the LoRA values ``n`` in float32, held :data:`ADAPTER_COPIES` times (the
  parameters, the global it started from, the trained snapshot and the delta).
- ``optimizer`` (backprop): a gradient plus AdamW's two moments, ``3 n x 4`` bytes.
- ``activations`` (backprop): everything autograd keeps for the backward pass, per decoder
  layer ``T x (ACT_HIDDEN h + ACT_INTERMEDIATE I)`` values for ``T = batch x seq`` tokens,
  plus the attention probabilities ``ATT_MAPS x batch x heads x seq^2`` with eager attention
  (SDPA kernels keep none).
- ``layer`` (forward only): the largest transient of one layer, since a no-grad forward
  frees each layer's tensors before the next; ``FWD_HIDDEN h + FWD_INTERMEDIATE I`` per
  token plus the attention maps.
- ``logits``: ``T x vocab`` float32 values times :data:`LOGIT_COPIES` for the method (logits
  and log-softmax in a forward; their gradients too in backprop).
- ``perturbations`` (fwdgrad): the flat adapter point, the perturbation and its signed copy
  in float32, and float64 accumulators: ``FWD_BUFFER_BYTES x n``. Central differences
  evaluate perturbations one after another, so K does not change the peak.
- ``top_k_logits`` (kd): the local method's step plus ``proxy rows x seq x top_k`` kept
  logits of 6 bytes (int32 id, fp16 value). Not yet checked against a measured peak.

A method is one entry of :data:`ESTIMATORS` (a function returning its parts); ``kd`` is its
local method's entry plus the kept logits, and a later method is one more entry. The
constants were fitted to peaks measured with ``edgefed bench memory`` and ``edgefed bench
estimate`` (bench/RESULTS.md); the device corrects what remains with its measured/estimated
ratio (``edge_agent.planner``).

See docs/architecture.md §7.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from schemas.errors import ConfigError

MB = 2**20
RUNTIME_MB = 400.0
"""Resident memory of a Python process with torch, transformers and peft imported, before
any model: 385-395 MB measured on the reference host (torch 2.13 CPU)."""
ADAPTER_COPIES = 4
ACT_HIDDEN = 10
"""Hidden-sized tensors autograd keeps per decoder layer and token (norm inputs and outputs,
q, k, v before and after RoPE, attention output, residuals)."""
ACT_INTERMEDIATE = 4
"""Intermediate-sized tensors kept per layer and token (gate, up, SiLU, product)."""
ATT_MAPS = 3
"""Attention score maps per layer with eager attention (scores, masked scores, softmax)."""
FWD_HIDDEN = 6
FWD_INTERMEDIATE = 3
LOGIT_COPIES: Mapping[str, int] = {"forward": 2, "backprop": 3, "jvp": 4}
FWD_BUFFER_BYTES = 4 * 4 + 3 * 8
"""Per adapter value in fwdgrad: four float32 vectors and three float64 accumulators."""
DTYPE_BYTES: Mapping[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}

Dtype = Literal["float32", "bfloat16", "float16"]
Attention = Literal["eager", "sdpa"]


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder that memory depends on."""

    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    attention: Attention = "sdpa"

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, object]) -> ModelShape:
        """Read the sizes from a Hugging Face ``config.json`` mapping.

        Raises:
            ConfigError: Not a decoder this estimator models (no ``intermediate_size`` ...).
        """
        try:
            hidden = int(str(config["hidden_size"]))
            heads = int(str(config["num_attention_heads"]))
            head_dim = config.get("head_dim") or hidden // heads
            return cls(
                name=name,
                vocab=int(str(config["vocab_size"])),
                hidden=hidden,
                intermediate=int(str(config["intermediate_size"])),
                layers=int(str(config["num_hidden_layers"])),
                heads=heads,
                kv_heads=int(str(config.get("num_key_value_heads") or heads)),
                head_dim=int(str(head_dim)),
                tied=bool(config.get("tie_word_embeddings", False)),
                attention="eager" if config.get("_attn_implementation") == "eager" else "sdpa",
            )
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"cannot size model {name!r}: missing or bad {exc}") from exc

    @property
    def params(self) -> int:
        """Base-model parameters: embeddings, untied head, attention, MLP, norms."""
        h, q_out, kv_out = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = h * q_out * 2 + h * kv_out * 2 + 3 * h * self.intermediate + 2 * h
        head = 0 if self.tied else self.vocab * h
        return self.vocab * h + head + self.layers * per_layer + h

    def module_dims(self, module: str) -> tuple[int, int]:
        """(in, out) features of a LoRA target module.

        Raises:
            ConfigError: Not a projection of a Llama block.
        """
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        dims = {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        if module not in dims:
            raise ConfigError(f"no size for LoRA target {module!r}; known: {sorted(dims)}")
        return dims[module]

    def adapter_values(self, rank: int, targets: tuple[str, ...]) -> int:
        """LoRA values ``rank x (in + out)`` per target module and layer."""
        return self.layers * sum(rank * sum(self.module_dims(t)) for t in targets)


KNOWN_CONFIGS: Mapping[str, Mapping[str, object]] = {
    "smollm2-135m": {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "tie_word_embeddings": True,
    },
}
"""Configs of packaged models, so ``edgefed plan`` works before their weights are prepared."""


def model_shape(name: str) -> ModelShape:
    """The shape of a model reference: ``tiny`` configs, a prepared folder, or the table.

    Raises:
        ConfigError: Unknown model, or one whose config this estimator cannot model.
    """
    from edgefed.library_internals import attention_implementation  # noqa: PLC0415
    from edgefed.ml import models as modeling  # noqa: PLC0415  (torch import only when sizing)
    from schemas.errors import AssetMissing  # noqa: PLC0415

    factory = modeling.TINY_MODELS.get(name)
    if factory is not None:
        config = factory()
        return ModelShape.from_config(
            name, config.to_dict() | {"_attn_implementation": attention_implementation(config)}
        )
    try:
        folder = modeling.model_folder(name)
    except (AssetMissing, ConfigError):
        if name in KNOWN_CONFIGS:
            return ModelShape.from_config(name, KNOWN_CONFIGS[name])
        raise
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    return ModelShape.from_config(name, config)


@dataclass(frozen=True)
class StepShape:
    """What one local step processes and trains."""

    batch: int
    seq_len: int
    rank: int = 8
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    perturbations: int = 16
    dtype: Dtype = "float32"
    proxy_rows: int = 0
    """kd: proxy rows whose top-k logits are kept for the upload."""
    top_k: int = 8
    cut: int | None = None
    """split: blocks the device runs (None: one)."""

    @property
    def tokens(self) -> int:
        """Tokens per step, ``batch x seq_len``."""
        return self.batch * self.seq_len


Parts = dict[str, float]
"""Named parts of an estimate, in bytes."""
Estimator = Callable[[ModelShape, StepShape], Parts]


def _common(model: ModelShape, step: StepShape) -> Parts:
    n = model.adapter_values(step.rank, step.targets)
    return {
        "weights": model.params * DTYPE_BYTES[step.dtype],
        "adapter": ADAPTER_COPIES * n * 4,
    }


def _attention_maps(model: ModelShape, step: StepShape) -> float:
    if model.attention != "eager":
        return 0.0
    return ATT_MAPS * step.batch * model.heads * step.seq_len**2 * DTYPE_BYTES[step.dtype]


def _forward_layer(model: ModelShape, step: StepShape) -> float:
    per_token = FWD_HIDDEN * model.hidden + FWD_INTERMEDIATE * model.intermediate
    return step.tokens * per_token * DTYPE_BYTES[step.dtype] + _attention_maps(model, step)


def _logits(model: ModelShape, step: StepShape, kind: str) -> float:
    return LOGIT_COPIES[kind] * step.tokens * model.vocab * 4


def estimate_lora(model: ModelShape, step: StepShape) -> Parts:
    """Backprop through LoRA: optimizer state and every layer's saved activations."""
    n = model.adapter_values(step.rank, step.targets)
    per_token = ACT_HIDDEN * model.hidden + ACT_INTERMEDIATE * model.intermediate
    per_layer = step.tokens * per_token * DTYPE_BYTES[step.dtype] + _attention_maps(model, step)
    return _common(model, step) | {
        "optimizer": 3 * n * 4,
        "activations": model.layers * per_layer,
        "logits": _logits(model, step, "backprop"),
    }


def estimate_fwdgrad(model: ModelShape, step: StepShape) -> Parts:
    """Central differences: inference memory plus the perturbation buffers."""
    n = model.adapter_values(step.rank, step.targets)
    return _common(model, step) | {
        "layer": _forward_layer(model, step),
        "logits": _logits(model, step, "forward"),
        "perturbations": FWD_BUFFER_BYTES * n,
    }


def estimate_fwdgrad_jvp(model: ModelShape, step: StepShape) -> Parts:
    """Forward-mode AD: a tangent beside every live activation and logit (one tangent)."""
    parts = estimate_fwdgrad(model, step)
    parts["layer"] *= 2
    parts["logits"] = _logits(model, step, "jvp")
    return parts


def _with_top_k(local: Estimator) -> Estimator:
    """kd: the local method's step plus the kept top-k logits (int32 id + fp16 value each)."""

    def estimate_kd(model: ModelShape, step: StepShape) -> Parts:
        kept = step.proxy_rows * step.seq_len * step.top_k * 6
        return local(model, step) | {"top_k_logits": kept}

    return estimate_kd


def estimate_split(model: ModelShape, step: StepShape) -> Parts:
    """Split learning's device: embeddings and ``cut`` blocks with backprop, no head.

    Besides that part's weights, adapter, optimizer and activations it holds the activations
    it sends and the gradient it gets back (plus their wire copies): ``4 x tokens x hidden``.
    """
    cut = min(max(step.cut or 1, 1), model.layers)
    share = cut / model.layers
    n = model.adapter_values(step.rank, step.targets) * share
    h, q_out, kv_out = model.hidden, model.heads * model.head_dim, model.kv_heads * model.head_dim
    per_layer = h * q_out * 2 + h * kv_out * 2 + 3 * h * model.intermediate + 2 * h
    per_token = ACT_HIDDEN * model.hidden + ACT_INTERMEDIATE * model.intermediate
    acts = step.tokens * per_token * DTYPE_BYTES[step.dtype] + _attention_maps(model, step)
    return {
        "weights": (model.vocab * h + cut * per_layer) * DTYPE_BYTES[step.dtype],
        "adapter": ADAPTER_COPIES * n * 4,
        "optimizer": 3 * n * 4,
        "activations": cut * acts,
        "exchange": 4 * step.tokens * h * 4,
    }


ESTIMATORS: dict[str, Estimator] = {
    "split": estimate_split,
    "lora": estimate_lora,
    "fwdgrad": estimate_fwdgrad,
    "fwdgrad-jvp": estimate_fwdgrad_jvp,
    "kd": _with_top_k(estimate_lora),
    "kd-fwdgrad": _with_top_k(estimate_fwdgrad),
}
"""Estimator key (a method, or method-variant) -> its parts; add a method with one entry."""


@dataclass(frozen=True)
class Estimate:
    """An estimated peak: the parts in MiB and their total."""

    method: str
    parts: Mapping[str, float]

    @property
    def total_mb(self) -> float:
        """The estimated peak resident memory, MiB."""
        return sum(self.parts.values())

    @property
    def step_mb(self) -> float:
        """What the step itself adds: the total less the runtime and the weights, MiB."""
        return self.total_mb - self.parts.get("runtime", 0.0) - self.parts.get("weights", 0.0)


def estimate(
    model: ModelShape, step: StepShape, method: str, *, runtime_mb: float = RUNTIME_MB
) -> Estimate:
    """The estimated peak of one step of ``method`` (an :data:`ESTIMATORS` key), in MiB.

    Raises:
        ConfigError: No estimator for ``method``.
    """
    estimator = ESTIMATORS.get(method)
    if estimator is None:
        raise ConfigError(f"no memory estimate for {method!r}; known: {sorted(ESTIMATORS)}")
    parts = {name: value / MB for name, value in estimator(model, step).items()}
    return Estimate(method=method, parts={"runtime": runtime_mb} | parts)
