"""Crash-safe checkpoints of the aggregator: kill it at any instant and it resumes exactly.

A checkpoint holds everything an acked update may live in: the global adapters the service
still keeps (the current one and the older bases of the staleness window), the version,
the state of every registered :class:`Stateful` part (the strategy's FedBuff buffer under
``strategy``, and whatever else registers: a K controller, variance estimates ...), the
accepted updates whose ids must still be recognised as repeats, counters, and the audit
lines the checkpoint adds (see ``aggregator.audit``).

On disk, in one folder::

    manifest.json                      the commit point: names every file below
    global-<version>.safetensors       one per kept version, written once
    state-<commit>.safetensors         tensors of the Stateful parts (may be absent)

Tensors are stored with safetensors, everything else as JSON in the manifest, where a tensor
is a ``{"$tensor": name}`` placeholder. Every file is written to a temporary name, fsynced
and renamed, and the folder is fsynced; the manifest goes last. A crash therefore leaves
either the previous checkpoint or the new one, never a mix; files no manifest names (an
interrupted save) are deleted on the next load. The manifest records each file's SHA-256,
so a damaged file is refused instead of loaded.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from aggregator.audit import MergeEntry, UpdateEntry
from schemas.errors import ConfigError
from schemas.messages import TensorMap

log = logging.getLogger(__name__)

MANIFEST: Final = "manifest.json"
FORMAT: Final = "edgefed-checkpoint"
FORMAT_VERSION: Final = 1
TENSOR_KEY: Final = "$tensor"
"""Marks a tensor placeholder in saved state; a state dict may not use it as a key."""

StateValue = object
"""What a state dict may hold: None, bool, int, float, str, tensors, and lists/str-keyed dicts."""


class Stateful(Protocol):
    """Anything whose state must survive a crash: strategies, controllers, estimators.

    Register it with the service under a stable key; its state dict may nest dicts with
    string keys, lists, tuples (restored as lists), numbers, strings, None and tensors.
    """

    def state_dict(self) -> dict[str, object]:
        """Return the state to save; tensors may be shared, they are copied on save."""
        ...

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what :meth:`state_dict` returned (tensors are float copies on the CPU)."""
        ...


@dataclass(frozen=True)
class Checkpoint:
    """One consistent snapshot of the aggregator.

    Attributes:
        commit: Sequence number, one more than the previous checkpoint's.
        federation: Federation the state belongs to; loading into another is refused.
        task_id: Task the state belongs to; likewise.
        version: The current global version.
        globals: Kept global adapters by version, oldest first; holds ``version``.
        run_id: The run resuming continues (``Task.run_id``); empty in older checkpoints.
        states: State dicts of the registered Stateful parts, by key.
        answered: Accepted updates a repeat of which must be re-acked, not merged.
        audit: The audit lines this checkpoint commits.
        counters: Running totals (merged, rejected, rejected per reason).
        published_chunks: Retained chunks per published version, to clear them later.
        created_at: Wall-clock time of the snapshot.
    """

    commit: int
    federation: str
    task_id: str
    version: int
    globals: Mapping[int, TensorMap]
    states: Mapping[str, dict[str, object]] = field(default_factory=dict)
    answered: tuple[UpdateEntry, ...] = ()
    audit: tuple[UpdateEntry | MergeEntry, ...] = ()
    counters: Mapping[str, int] = field(default_factory=dict)
    published_chunks: Mapping[int, int] = field(default_factory=dict)
    run_id: str = ""
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        """Refuse a snapshot that could not be resumed from."""
        if self.version not in self.globals:
            raise ValueError(f"checkpoint of version {self.version} lacks that global")


# --------------------------------------------------------------------------- state encoding


def flatten_state(
    state: Mapping[str, object], prefix: str
) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    """Split a state dict into JSON-able data and named tensors (``prefix/path``).

    Raises:
        ConfigError: For values a checkpoint cannot hold, non-string keys, or the
            reserved ``$tensor`` key.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: object, path: str) -> object:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().to("cpu").contiguous().clone()
            return {TENSOR_KEY: path}
        if value is None or isinstance(value, bool | int | str):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"$float": repr(value)}
        if isinstance(value, list | tuple):
            return [walk(item, f"{path}/{index}") for index, item in enumerate(value)]
        if isinstance(value, Mapping):
            out: dict[str, object] = {}
            for key, item in value.items():
                if not isinstance(key, str) or key in (TENSOR_KEY, "$float"):
                    raise ConfigError(f"state key {key!r} at {path} cannot be checkpointed")
                out[key] = walk(item, f"{path}/{key}")
            return out
        raise ConfigError(f"state at {path} holds a {type(value).__name__}, not checkpointable")

    data = walk(dict(state), prefix)
    assert isinstance(data, dict)
    return data, tensors


def unflatten_state(data: object, tensors: Mapping[str, torch.Tensor]) -> object:
    """Put tensors back in place of their placeholders.

    Raises:
        ConfigError: A placeholder names a tensor that is not there.
    """
    if isinstance(data, list):
        return [unflatten_state(item, tensors) for item in data]
    if isinstance(data, dict):
        if set(data) == {TENSOR_KEY}:
            name = data[TENSOR_KEY]
            if not isinstance(name, str) or name not in tensors:
                raise ConfigError(f"checkpoint state refers to a missing tensor {name!r}")
            return tensors[name]
        if set(data) == {"$float"} and data["$float"] in ("nan", "inf", "-inf"):
            return float(data["$float"])
        return {key: unflatten_state(item, tensors) for key, item in data.items()}
    return data


# --------------------------------------------------------------------------- files


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new, never a part.

    The bytes go to ``<path>.tmp``, are fsynced, renamed over ``path``, and the folder is
    fsynced so the rename itself survives a power cut.
    """
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


class _FileRef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    file: str
    sha256: str


class _GlobalRef(_FileRef):
    version: int


class _Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["edgefed-checkpoint"]
    format_version: int
    commit: int
    federation: str
    task_id: str
    version: int
    globals: list[_GlobalRef]
    state_file: _FileRef | None
    states: dict[str, object]
    answered: list[UpdateEntry]
    audit: list[UpdateEntry | MergeEntry]
    counters: dict[str, int]
    published_chunks: dict[int, int]
    run_id: str = ""
    created_at: float


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    payload: bytes = save_safetensors(
        {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in tensors.items()}
    )
    return payload


class CheckpointStore:
    """Saves and loads :class:`Checkpoint` objects in one folder (one writer at a time)."""

    def __init__(self, directory: str | Path) -> None:
        """Use ``directory`` (created when missing)."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._committed_globals: dict[int, _GlobalRef] = {}
        """Global files named by the last committed manifest: never rewritten."""

    @property
    def manifest_path(self) -> Path:
        """Where the commit point lives."""
        return self.directory / MANIFEST

    def save(self, checkpoint: Checkpoint) -> None:
        """Write ``checkpoint`` durably; returns once it is the one :meth:`load` finds."""
        refs: list[_GlobalRef] = []
        for version, adapter in checkpoint.globals.items():
            known = self._committed_globals.get(version)
            if known is None:
                data = _tensor_bytes(adapter)
                known = _GlobalRef(
                    version=version, file=f"global-{version:012d}.safetensors", sha256=_digest(data)
                )
                write_atomic(self.directory / known.file, data)
            refs.append(known)
        states: dict[str, object] = {}
        tensors: dict[str, torch.Tensor] = {}
        for key, state in checkpoint.states.items():
            data_part, tensor_part = flatten_state(state, key)
            states[key] = data_part
            tensors.update(tensor_part)
        state_ref: _FileRef | None = None
        if tensors:
            data = _tensor_bytes(tensors)
            state_ref = _FileRef(
                file=f"state-{checkpoint.commit:012d}.safetensors", sha256=_digest(data)
            )
            write_atomic(self.directory / state_ref.file, data)
        manifest = _Manifest(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            commit=checkpoint.commit,
            federation=checkpoint.federation,
            task_id=checkpoint.task_id,
            version=checkpoint.version,
            globals=refs,
            state_file=state_ref,
            states=states,
            answered=list(checkpoint.answered),
            audit=list(checkpoint.audit),
            counters=dict(checkpoint.counters),
            published_chunks=dict(checkpoint.published_chunks),
            run_id=checkpoint.run_id,
            created_at=checkpoint.created_at,
        )
        write_atomic(self.manifest_path, manifest.model_dump_json().encode())
        self._committed_globals = {ref.version: ref for ref in refs}
        self._collect_garbage(manifest)

    def load(self, *, federation: str, task_id: str) -> Checkpoint | None:
        """The latest committed checkpoint, or None when the folder holds none.

        Raises:
            ConfigError: The checkpoint belongs to another federation or task, is from an
                unknown format, or a file it names is missing or damaged.
        """
        manifest = self._manifest(federation=federation, task_id=task_id)
        if manifest is None:
            self._collect_garbage(None)
            return None
        globals_: dict[int, TensorMap] = {
            ref.version: self._read_tensors(ref) for ref in manifest.globals
        }
        stored: dict[str, torch.Tensor] = {}
        if manifest.state_file is not None:
            stored = self._read_tensors(manifest.state_file)
        states: dict[str, dict[str, object]] = {}
        for key, data in manifest.states.items():
            restored = unflatten_state(data, stored)
            if not isinstance(restored, dict):
                raise ConfigError(f"checkpoint state {key!r} is not a mapping")
            states[key] = restored
        self._committed_globals = {ref.version: ref for ref in manifest.globals}
        self._collect_garbage(manifest)
        try:
            return Checkpoint(
                commit=manifest.commit,
                federation=manifest.federation,
                task_id=manifest.task_id,
                version=manifest.version,
                globals=globals_,
                states=states,
                answered=tuple(manifest.answered),
                audit=tuple(manifest.audit),
                counters=manifest.counters,
                published_chunks=manifest.published_chunks,
                run_id=manifest.run_id,
                created_at=manifest.created_at,
            )
        except ValueError as exc:
            raise ConfigError(f"{self.manifest_path}: {exc}") from exc

    def kept_globals(self, *, federation: str, task_id: str) -> tuple[int, dict[int, TensorMap]]:
        """The committed version and the globals kept with it, changing no file.

        A running aggregator may own the folder, so nothing is collected here.

        Raises:
            ConfigError: As :meth:`load`, or the folder holds no checkpoint.
        """
        manifest = self._manifest(federation=federation, task_id=task_id)
        if manifest is None:
            raise ConfigError(f"{self.directory} holds no checkpoint")
        return manifest.version, {ref.version: self._read_tensors(ref) for ref in manifest.globals}

    def _manifest(self, *, federation: str, task_id: str) -> _Manifest | None:
        try:
            raw = self.manifest_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            manifest = _Manifest.model_validate_json(raw)
        except ValidationError as exc:
            raise ConfigError(f"{self.manifest_path} is not a readable checkpoint: {exc}") from exc
        if manifest.format_version != FORMAT_VERSION:
            raise ConfigError(
                f"checkpoint format {manifest.format_version} is not {FORMAT_VERSION}; "
                "move the folder away to start afresh"
            )
        if (manifest.federation, manifest.task_id) != (federation, task_id):
            raise ConfigError(
                f"{self.directory} holds federation {manifest.federation!r} task "
                f"{manifest.task_id!r}, not {federation!r} {task_id!r}"
            )
        return manifest

    def _read_tensors(self, ref: _FileRef) -> dict[str, torch.Tensor]:
        path = self.directory / ref.file
        if Path(ref.file).name != ref.file:
            raise ConfigError(f"checkpoint names a file outside its folder: {ref.file!r}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"checkpoint file {path} cannot be read: {exc}") from exc
        if _digest(data) != ref.sha256:
            raise ConfigError(f"checkpoint file {path} is damaged (SHA-256 mismatch)")
        try:
            tensors: dict[str, torch.Tensor] = load_safetensors(data)
        except SafetensorError as exc:
            raise ConfigError(f"checkpoint file {path} is not safetensors: {exc}") from exc
        return tensors

    def _collect_garbage(self, manifest: _Manifest | None) -> None:
        """Delete files the committed manifest does not name (older or interrupted saves)."""
        keep = {MANIFEST}
        if manifest is not None:
            keep.update(ref.file for ref in manifest.globals)
            if manifest.state_file is not None:
                keep.add(manifest.state_file.file)
        for path in self.directory.iterdir():
            name = path.name
            owned = name.endswith((".safetensors", ".tmp")) and (
                name.startswith(("global-", "state-", MANIFEST))
            )
            if path.is_file() and owned and name not in keep:
                path.unlink(missing_ok=True)
