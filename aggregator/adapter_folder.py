"""The federation's adapter as a PEFT folder: started from one, kept as one, exported as one.

With a ``checkpoint_dir``, the aggregator keeps ``<checkpoint_dir>/adapter/`` at the latest
published global: ``adapter_config.json`` and the weights (what
``PeftModel.from_pretrained(base, folder)`` loads) plus ``edgefed.json``, which names the
federation, run, version and the base model and adapter settings that rebuild it.
``edgefed export`` writes any version the checkpoint still keeps the same way, and
``init_adapter`` starts a fresh federation from such a folder (or any PEFT LoRA folder with
the federation's settings).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

from peft import PeftModel
from pydantic import ValidationError

from aggregator.checkpoint import CheckpointStore
from aggregator.config import AggregatorConfig
from edgefed.data.sources import num_labels
from edgefed.ml.adapter_files import is_adapter, read_adapter, replace_adapter_folder
from edgefed.ml.models import attach_lora, build_model, get_adapter
from edgefed.settings import Settings
from schemas.errors import ConfigError
from schemas.messages import LoraSpec, ModelRef, TensorMap

log = logging.getLogger(__name__)

ADAPTER_DIR: Final = "adapter"
INFO_FILE: Final = "edgefed.json"


class FederationModel(Settings):
    """What builds the federation's model: the base, the adapter, the head's classes, the seed."""

    model: ModelRef
    lora: LoraSpec
    dataset: str
    """Sizes a classifier's head (its number of classes)."""
    seed: int

    @classmethod
    def of(cls, config: AggregatorConfig) -> FederationModel:
        """The model ``config`` federates."""
        return cls(model=config.model, lora=config.lora, dataset=config.dataset, seed=config.seed)

    def build(self) -> PeftModel:
        """The base model with the adapter attached, as every participant builds it."""
        base = build_model(self.model, seed=self.seed, num_labels=num_labels(self.dataset))
        return attach_lora(base, self.lora)


class AdapterInfo(Settings):
    """``edgefed.json`` of an adapter folder: where the weights come from, and their base."""

    federation: str
    task_id: str
    run_id: str
    version: int
    base: FederationModel


def initial_adapter(config: AggregatorConfig, model: PeftModel) -> TensorMap:
    """Version 0 of a fresh run: ``init_adapter``'s weights, else the adapter as attached.

    Raises:
        ConfigError: ``init_adapter`` is not a PEFT folder that fits ``config``'s ``[lora]``.
    """
    if config.init_adapter is None:
        return get_adapter(model)
    log.info("starting from the adapter in %s", config.init_adapter)
    return read_adapter(model, config.init_adapter)


def keep_latest(
    model: PeftModel, tensors: TensorMap, config: AggregatorConfig, *, version: int, run_id: str
) -> Path | None:
    """Replace ``<checkpoint_dir>/adapter/`` with ``tensors``, global ``version``."""
    if config.checkpoint_dir is None:
        return None
    info = AdapterInfo(
        federation=config.federation,
        task_id=config.task_id,
        run_id=run_id,
        version=version,
        base=FederationModel.of(config),
    )
    folder = Path(config.checkpoint_dir) / ADAPTER_DIR
    return replace_adapter_folder(model, tensors, folder, info=info.model_dump(mode="json"))


def export_version(checkpoint_dir: str | Path, out: str | Path, version: int | None) -> AdapterInfo:
    """Write global ``version`` (None: the latest) of a checkpoint as a PEFT folder ``out``.

    Only reads ``checkpoint_dir``, so it may run beside the aggregator that writes it.

    Raises:
        ConfigError: No adapter record or checkpoint in ``checkpoint_dir``, or ``version`` is
            not among the globals it keeps (the latest ``max_staleness + 1``).
    """
    target = Path(out)
    if target.is_file() or (target.is_dir() and any(target.iterdir()) and not is_adapter(target)):
        raise ConfigError(f"{target} exists and is not an adapter folder: name a new one")
    info = _read_info(Path(checkpoint_dir) / ADAPTER_DIR / INFO_FILE)
    store = CheckpointStore(checkpoint_dir)
    latest, kept = store.kept_globals(federation=info.federation, task_id=info.task_id)
    chosen = latest if version is None else version
    if chosen not in kept:
        raise ConfigError(
            f"{checkpoint_dir} keeps versions {sorted(kept)} of run {info.run_id}, not {chosen}"
        )
    model = info.base.build()
    exported = info.model_copy(update={"version": chosen})
    replace_adapter_folder(model, kept[chosen], target, info=exported.model_dump(mode="json"))
    return exported


def _read_info(path: Path) -> AdapterInfo:
    try:
        return AdapterInfo.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(
            f"{path} is missing: is this the checkpoint_dir of an aggregator that published "
            "a version?"
        ) from None
    except (OSError, ValidationError) as exc:
        raise ConfigError(f"{path} is not readable: {exc}") from exc
