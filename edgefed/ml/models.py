"""Base models and LoRA adapters, built the same way on every participant.

Federated LoRA only works when the aggregator and every device hold the same frozen base
weights and start from the same adapter, so everything here is deterministic: the ``tiny``
models are drawn from a fixed seed, and LoRA's A matrices come from ``LoraSpec.seed`` and
the module name, never from whatever state the global RNG happens to be in.

Adapter tensors travel under names without peft's adapter-name suffix
(``...q_proj.lora_A.weight``, not ``...q_proj.lora_A.default.weight``). The mapping
between the two lives only in :func:`adapter_parameters`; everything else goes through it.
A classification head trained beside the adapter (encoders such as MiniLM) travels the same
way, as ``...classifier.weight``.

Besides ``tiny`` built from a config, models are loaded from local folders only: the
packaged ``smollm2-135m`` (causal LM) and ``minilm-l6`` (encoder, gets a classification
head) that ``edgefed assets`` prepares, or any Hugging Face folder. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from edgefed import assets
from edgefed.ml.pooling import pool_by_mean, trained_pooling
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
_PEFT_HEAD = re.compile(rf"\.modules_to_save\.{_ADAPTER_NAME}\.")
_PEFT_TOKENS = re.compile(rf"\.trainable_tokens_delta\.{_ADAPTER_NAME}$")
ANSWER_ROWS = ".trainable_tokens_delta"
"""Wire names of a causal LM's trained answer-token rows end with this."""
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
    return LlamaConfig(
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
        attn_implementation="eager",  # type: ignore[call-arg]  # a PretrainedConfig kwarg LlamaConfig's typed signature omits
    )


TINY_MODELS: dict[str, Callable[[], LlamaConfig]] = {
    "tiny": tiny_config,
    "tiny-4l": lambda: tiny_config(layers=4),
}
"""Models built from a config rather than loaded: name -> config factory."""


PACKAGED_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m": assets.smollm2_dir,
    "minilm-l6": assets.minilm_dir,
}
"""Models shipped by PyPI packages (see ``edgefed.assets``): name -> their local folder."""

ModelKind = Literal["causal", "classifier"]
"""How a model is trained: next-token prediction, or a classification head on an encoder."""

_ENCODER_TARGETS = {"q_proj": "query", "k_proj": "key", "v_proj": "value"}
"""LoRA target names in Llama style mapped to BERT-style encoders' module names."""

_LOADED: dict[tuple[str, str, int, int, str], PreTrainedModel] = {}
"""Base models loaded from folders, by (folder, kind, labels, head seed, device); never handed out.

Every model :func:`build_model` returns for a folder is a copy whose parameters are these
templates' tensors, so a process that simulates a fleet holds the weights once and starts
each device in a fraction of a second. edgefed never changes base weights (only adapters
and heads, which peft copies), so the sharing is invisible; code that merges an adapter
into the base in place must build its model elsewhere.
"""

_GLOBAL_STATE_LOCK = threading.Lock()
"""Guards torch's global RNG and the warning filters while a model is built.

Agents build models in worker threads; without the lock two builds interleave their
draws from the one global generator and participants no longer share a base model.
"""


def _name(ref: ModelRef | str) -> str:
    return ref.name if isinstance(ref, ModelRef) else ref


def model_folder(ref: ModelRef | str) -> Path:
    """The local folder a packaged name or a path refers to.

    Raises:
        AssetMissing: A packaged model that ``edgefed assets`` has not prepared.
        ConfigError: Neither a packaged name nor a folder with a ``config.json``.
    """
    name = _name(ref)
    packaged = PACKAGED_MODELS.get(name)
    path = packaged() if packaged is not None else Path(name).expanduser()
    if not path.is_dir():
        known = sorted([*TINY_MODELS, *PACKAGED_MODELS])
        raise ConfigError(f"unknown model {name!r}: not one of {known} and not a local folder")
    if not (path / "config.json").is_file():
        raise ConfigError(f"model folder {str(path)!r} has no config.json")
    return path


def model_kind(ref: ModelRef | str) -> ModelKind:
    """``causal`` for language models (trained on next tokens), ``classifier`` for encoders."""
    if _name(ref) in TINY_MODELS:
        return "causal"
    path = model_folder(ref)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot read the model config in {str(path)!r}: {exc}") from exc
    architectures = getattr(config, "architectures", None) or []
    return "causal" if any(a.endswith("ForCausalLM") for a in architectures) else "classifier"


def load_tokenizer(ref: ModelRef | str) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside a packaged or local model.

    Raises:
        ConfigError: ``tiny`` models have no tokenizer (they use token ids directly), or
            the folder has none.
    """
    if _name(ref) in TINY_MODELS:
        raise ConfigError(
            f"model {_name(ref)!r} has no tokenizer: text datasets need a real model "
            f"such as {sorted(PACKAGED_MODELS)} or a local folder"
        )
    path = model_folder(ref)
    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            path, local_files_only=True
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot load a tokenizer from {str(path)!r}: {exc}") from exc
    return tokenizer


def build_model(
    ref: ModelRef | str, *, seed: int = 0, num_labels: int | None = None, device: str = "cpu"
) -> PreTrainedModel:
    """Build or load the base model every participant of a task shares.

    A name from :data:`TINY_MODELS` is built from its config with ``seed``, so every
    process that builds it with the same seed (and torch version) gets bit-identical
    weights; the caller's RNG state is left untouched. Anything else is a packaged name
    (:data:`PACKAGED_MODELS`) or a local folder written by ``save_pretrained``; nothing is
    ever downloaded. Encoders get a classification head of ``num_labels`` outputs, drawn
    from ``seed`` so that every participant starts from the same head, over the pooling
    they were trained with (:mod:`edgefed.ml.pooling`: the mean of MiniLM's token states).
    ``ModelRef.revision`` has no meaning here and is ignored.

    Args:
        ref: The model reference from the task, or just its name.
        seed: Seed for the weights of built (``tiny``) models and new heads.
        num_labels: Classes of an encoder's head (default 2); ignored for causal LMs.
        device: The torch device the weights live on (drawn or loaded on the CPU first).

    Models from folders are loaded once per process; later builds share those frozen weight
    tensors (see :data:`_LOADED`).

    Returns:
        The model, in training mode as transformers leaves it.

    Raises:
        AssetMissing: A packaged model is not installed (the message names the command).
        ConfigError: The name is neither known nor a loadable local folder.
    """
    factory = TINY_MODELS.get(_name(ref))
    if factory is not None:
        config = factory()
        with _GLOBAL_STATE_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _on(LlamaForCausalLM(config), device)
    path = model_folder(ref)
    kind = model_kind(ref)
    labels = (num_labels or 2) if kind == "classifier" else 0
    with _GLOBAL_STATE_LOCK:
        key = (str(path.resolve()), kind, labels, seed if kind != "causal" else 0, device)
        template = _LOADED.get(key)
        if template is None:
            template = _LOADED[key] = _on(_load(path, kind, labels, seed), device)
        # A new module tree over the same weight tensors: no second copy of the weights.
        shared = {id(param): param for param in template.parameters()}
        model: PreTrainedModel = copy.deepcopy(template, shared)
    model.train()
    return model


def _load(path: Path, kind: ModelKind, labels: int, seed: int) -> PreTrainedModel:
    """A model from a local folder, a classifier's new head drawn from ``seed``.

    Raises:
        ConfigError: The folder does not hold a loadable model of ``kind``.
    """
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # one bar per agent for a local file is only noise
    options: dict[str, Any] = {"local_files_only": True}
    if kind == "classifier":
        options["num_labels"] = labels
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model: PreTrainedModel = auto.from_pretrained(path, **options)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot load a {kind} model from {str(path)!r}: {exc}") from exc
    if kind == "classifier" and trained_pooling(path) == "mean":
        pool_by_mean(model)
    return model


def _on(model: PreTrainedModel, device: str) -> PreTrainedModel:
    """``model``, moved to ``device`` in place (transformers types ``to`` without devices)."""
    torch.nn.Module.to(model, device)
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
    the products B·A (docs/architecture.md §5).

    Args:
        model: The base model from :func:`build_model`; it is modified in place.
        spec: Rank, alpha, dropout, target modules, mode and seed of the adapter.

    Returns:
        The peft model; its base weights are frozen.

    Raises:
        ConfigError: A target module does not exist in ``model``.
    """
    causal = not _is_encoder(model)
    targets = [t if causal else _ENCODER_TARGETS.get(t, t) for t in spec.target_modules]
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,  # type: ignore[arg-type]  # peft divides it by r; floats work
        lora_dropout=spec.dropout,
        target_modules=targets,
        bias="none",
        # SEQ_CLS also trains (and ships) the new classification head beside the adapter.
        task_type="CAUSAL_LM" if causal else "SEQ_CLS",
        # A causal LM's answer rows of its LM head (tied to the embedding, or its own): a head.
        trainable_token_indices=(
            {_answer_module(model): list(spec.head_tokens)} if causal and spec.head_tokens else None
        ),
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
            elif ".lora_B." in name:
                param.zero_()
                param.requires_grad_(True)
            else:  # a classification head or answer rows: start as built
                param.requires_grad_(True)
    return peft_model


def _answer_module(model: PreTrainedModel) -> str:
    """Where a causal LM's answer rows train: its LM head, or the embedding tied to it."""
    return "embed_tokens" if getattr(model.config, "tie_word_embeddings", False) else "lm_head"


def lora_spec(model: PeftModel) -> LoraSpec:
    """The spec ``model``'s adapter was attached with.

    Raises:
        ConfigError: ``model`` did not come from :func:`attach_lora`.
    """
    spec = getattr(model, _SPEC_ATTR, None)
    if not isinstance(spec, LoraSpec):
        raise ConfigError("model has no edgefed LoRA adapter; build it with attach_lora()")
    return spec


def _is_encoder(model: PreTrainedModel) -> bool:
    """Whether ``model`` is a sequence classifier (built for an encoder) or a causal LM."""
    return type(model).__name__.endswith("ForSequenceClassification")


def classifier_classes(model: PeftModel) -> int | None:
    """How many classes ``model`` scores if it is a sequence classifier; None for an LM."""
    base = cast("PreTrainedModel", model.get_base_model())
    return base.config.num_labels if _is_encoder(base) else None


def _lora_parameters(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """Every LoRA A and B parameter and any trained head or answer rows, by wire name, sorted."""
    found: dict[str, torch.nn.Parameter] = {}
    for peft_name, param in model.named_parameters():
        wire_name, count = _PEFT_PARAM.subn(r".\1.weight", peft_name)
        if not count:
            wire_name, count = _PEFT_HEAD.subn(".", peft_name)
        if not count:
            wire_name, count = _PEFT_TOKENS.subn(ANSWER_ROWS, peft_name)
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


def export_adapter(model: PeftModel, tensors: TensorMap, path: str | Path) -> Path:
    """Write ``tensors`` as a standard peft adapter folder (``adapter_config.json`` + weights).

    The folder loads with ``PeftModel.from_pretrained(base, path)`` on the base model
    (including the frozen A of ``ffa`` mode and any classification head), so results can
    be used without edgefed. A sentence encoder's base classifies by the mean of its token
    states here (:mod:`edgefed.ml.pooling`): give the plain transformers model the same
    pooling first, with ``edgefed.ml.pooling.pool_by_mean(base)``.

    Raises:
        ConfigError: ``tensors`` do not fit the model.
    """
    set_adapter(model, tensors)
    target = Path(path)
    model.save_pretrained(str(target))
    return target


def set_torch_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count; returns the count in effect.

    Devices that share their CPU with other busy processes train faster with one thread
    than with a contended pool (docs/architecture.md §8b), so agents expose this as a setting.

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
