"""Base models and LoRA adapters, built the same way on every participant.

Federated LoRA only works when the aggregator and every device hold the same frozen base
weights and start from the same adapter, so everything here is deterministic: the ``tiny``
models are drawn from a fixed seed, and LoRA's A matrices come from ``LoraSpec.seed`` and
the module name, never from whatever state the global RNG happens to be in.

Adapter tensors travel under names without peft's adapter-name suffix
(``...q_proj.lora_A.weight``, not ``...q_proj.lora_A.default.weight``). The mapping
between the two lives only in :func:`adapter_parameters`; everything else goes through it.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from schemas.errors import ConfigError
from schemas.messages import LoraSpec, ModelRef, TensorMap

TINY_VOCAB = 64
"""Vocabulary of the ``tiny`` models; the synthetic task in ``edgefed.data`` uses it whole."""

TINY_INIT_STD = 0.1
"""Weight init scale of the ``tiny`` models, about 1/sqrt(hidden).

transformers' default (0.02) is tuned for hidden sizes in the thousands. At hidden 64 it
leaves the frozen lm_head so small that, behind the final RMSNorm, no adapter can push a
logit more than ~1.3 above the rest: loss could never fall below ~0.7x of its start.
"""

_ADAPTER_NAME = "default"
"""The single peft adapter every edgefed model carries."""

_PEFT_PARAM = re.compile(rf"\.(lora_A|lora_B)\.{_ADAPTER_NAME}\.weight$")
_SPEC_ATTR = "edgefed_lora_spec"


def tiny_config(*, layers: int = 2, hidden: int = 64) -> LlamaConfig:
    """A small Llama for tests and simulations: fast on one CPU core, big enough to learn.

    Args:
        layers: Number of decoder blocks.
        hidden: Hidden size; must be divisible by the 4 attention heads.

    Returns:
        The config; eager attention so results do not depend on which kernels exist.
    """
    if layers < 1 or hidden < 4 or hidden % 4:
        raise ConfigError(
            f"tiny model needs layers >= 1 and hidden divisible by 4, got {layers=} {hidden=}"
        )
    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        initializer_range=TINY_INIT_STD,
        tie_word_embeddings=False,
        use_cache=False,
    )
    # The constructor's typed signature omits the kwarg; this is the setter it uses.
    config._attn_implementation = "eager"
    return config


TINY_MODELS: dict[str, Callable[[], LlamaConfig]] = {
    "tiny": tiny_config,
    "tiny-4l": lambda: tiny_config(layers=4),
}
"""Models built from a config rather than loaded: name -> config factory."""


_GLOBAL_STATE_LOCK = threading.Lock()
"""Guards torch's global RNG and the warning filters while a model is built.

Agents build models in worker threads; without the lock two builds interleave their
draws from the one global generator and participants no longer share a base model.
"""


def build_model(ref: ModelRef | str, *, seed: int = 0) -> PreTrainedModel:
    """Build or load the base model every participant of a task shares.

    A name from :data:`TINY_MODELS` is built from its config with ``seed``, so every
    process that builds it with the same seed (and torch version) gets bit-identical
    weights; the caller's RNG state is left untouched. Anything else must be a local
    folder written by ``save_pretrained``; nothing is ever downloaded. ``ModelRef.revision``
    has no meaning for either and is ignored.

    Args:
        ref: The model reference from the task, or just its name.
        seed: Seed for the weights of built (``tiny``) models.

    Returns:
        The causal LM, in training mode as transformers leaves it.

    Raises:
        ConfigError: The name is neither a known tiny model nor a loadable local folder.
    """
    name = ref.name if isinstance(ref, ModelRef) else ref
    factory = TINY_MODELS.get(name)
    if factory is not None:
        config = factory()
        with _GLOBAL_STATE_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return LlamaForCausalLM(config)
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"unknown model {name!r}: not one of {sorted(TINY_MODELS)} and not a local folder"
        )
    if not (path / "config.json").is_file():
        raise ConfigError(f"model folder {str(path)!r} has no config.json")
    try:
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot load a causal LM from {str(path)!r}: {exc}") from exc
    return model


def _derived_seed(seed: int, name: str) -> int:
    """A 64-bit seed for one tensor, stable across processes (unlike ``hash``)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def attach_lora(model: PreTrainedModel, spec: LoraSpec) -> PeftModel:
    """Wrap ``model`` with the LoRA adapter ``spec`` describes, identically everywhere.

    B starts at zero (the adapter is a no-op at version 0). Each A is redrawn from a
    generator seeded by ``spec.seed`` and the tensor's name, with peft's default
    kaiming-uniform bound, so it does not depend on the global RNG or on which other
    modules are targeted. In ``ffa`` mode A stays frozen at that draw and only B trains:
    every client's update then shares the same A, and averaging B is exactly averaging
    the products B·A (DESIGN §5).

    Args:
        model: The base model from :func:`build_model`; it is modified in place.
        spec: Rank, alpha, dropout, target modules, mode and seed of the adapter.

    Returns:
        The peft model; its base weights are frozen.

    Raises:
        ConfigError: A target module does not exist in ``model``.
    """
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,  # type: ignore[arg-type]  # peft divides it by r; floats work
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with _GLOBAL_STATE_LOCK, torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft still asks transformers for a renamed attribute; nothing for us to act on.
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        try:
            peft_model: PeftModel = get_peft_model(model, config, adapter_name=_ADAPTER_NAME)
        except ValueError as exc:
            raise ConfigError(f"cannot attach LoRA {spec.target_modules}: {exc}") from exc
    setattr(peft_model, _SPEC_ATTR, spec)
    with torch.no_grad():
        for name, param in _lora_parameters(peft_model).items():
            if ".lora_A." in name:
                bound = 1.0 / math.sqrt(param.shape[1])
                gen = torch.Generator().manual_seed(_derived_seed(spec.seed, name))
                draw = torch.rand(param.shape, generator=gen, dtype=torch.float32)
                param.copy_(draw * (2 * bound) - bound)
                param.requires_grad_(spec.mode != "ffa")
            else:
                param.zero_()
                param.requires_grad_(True)
    return peft_model


def lora_spec(model: PeftModel) -> LoraSpec:
    """The spec ``model``'s adapter was attached with.

    Raises:
        ConfigError: ``model`` did not come from :func:`attach_lora`.
    """
    spec = getattr(model, _SPEC_ATTR, None)
    if not isinstance(spec, LoraSpec):
        raise ConfigError("model has no edgefed LoRA adapter; build it with attach_lora()")
    return spec


def _lora_parameters(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """Every LoRA A and B parameter, by wire name, sorted."""
    found: dict[str, torch.nn.Parameter] = {}
    for peft_name, param in model.named_parameters():
        wire_name, count = _PEFT_PARAM.subn(r".\1.weight", peft_name)
        if count:
            found[wire_name] = param
    return dict(sorted(found.items()))


def adapter_parameters(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """The adapter's trainable parameters by wire name, in sorted order.

    This is the adapter as it travels: A and B in ``standard`` mode, only B in ``ffa``
    mode, where A is a shared constant every participant derives from the seed.
    Trainers optimise exactly these parameters.

    Raises:
        ConfigError: ``model`` did not come from :func:`attach_lora`.
    """
    frozen_a = lora_spec(model).mode == "ffa"
    return {
        name: param
        for name, param in _lora_parameters(model).items()
        if not (frozen_a and ".lora_A." in name)
    }


def adapter_shapes(model: PeftModel) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every adapter tensor, for validating incoming updates."""
    return {name: tuple(param.shape) for name, param in adapter_parameters(model).items()}


def get_adapter(model: PeftModel) -> TensorMap:
    """A snapshot of the adapter: detached float32 CPU copies, sorted by name."""
    return {
        name: param.detach().to(device="cpu", dtype=torch.float32, copy=True)
        for name, param in adapter_parameters(model).items()
    }


def set_adapter(model: PeftModel, tensors: TensorMap) -> None:
    """Overwrite the adapter in place with ``tensors`` (any float dtype, any device).

    Strict, because a silently partial load would train from a wrong starting point:
    nothing is copied unless every name and shape matches.

    Raises:
        ConfigError: Names are missing or unexpected, or a shape or dtype does not fit.
    """
    params = adapter_parameters(model)
    missing = sorted(params.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - params.keys())
    problems: list[str] = []
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    for name in sorted(params.keys() & tensors.keys()):
        want, got = tuple(params[name].shape), tensors[name]
        if tuple(got.shape) != want:
            problems.append(f"{name}: shape {tuple(got.shape)} != {want}")
        elif not got.is_floating_point():
            problems.append(f"{name}: dtype {got.dtype} is not floating point")
    if problems:
        raise ConfigError("adapter does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])


def set_torch_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count; returns the count in effect.

    Devices that share their CPU with other busy processes train faster with one thread
    than with a contended pool (DESIGN §8b), so agents expose this as a setting.

    Args:
        threads: Threads to use; ``None`` keeps torch's current setting.

    Raises:
        ConfigError: ``threads`` is below 1.
    """
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"torch threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()
