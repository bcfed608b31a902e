"""Checkpoints: exact round trips, atomic commits, damage detection, the state extension point."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from aggregator.audit import MergeEntry, UpdateEntry
from aggregator.checkpoint import (
    Checkpoint,
    CheckpointStore,
    flatten_state,
    unflatten_state,
    write_atomic,
)
from aggregator.strategies import FedBuff
from schemas.errors import ConfigError
from schemas.messages import TensorMap

FED, TASK = "fed", "task-1"


def adapter(seed: int) -> TensorMap:
    generator = torch.Generator().manual_seed(seed)
    return {
        "a.lora_A.weight": torch.randn(2, 4, generator=generator),
        "a.lora_B.weight": torch.randn(4, 2, generator=generator),
    }


def as_bytes(tensors: TensorMap) -> dict[str, tuple[str, bytes]]:
    return {
        name: (str(t.dtype), t.contiguous().view(torch.uint8).numpy().tobytes())
        for name, t in tensors.items()
    }


def make_checkpoint(commit: int, version: int, **changes: object) -> Checkpoint:
    fields: dict[str, object] = {
        "commit": commit,
        "federation": FED,
        "task_id": TASK,
        "version": version,
        "globals": {v: adapter(v) for v in range(max(0, version - 2), version + 1)},
    }
    return Checkpoint(**(fields | changes))  # type: ignore[arg-type]


def load(store: CheckpointStore) -> Checkpoint:
    loaded = store.load(federation=FED, task_id=TASK)
    assert loaded is not None
    return loaded


def test_checkpoint_round_trips_globals_buffer_and_extra_state_bit_for_bit(tmp_path: Path) -> None:
    buffer = FedBuff(3)
    current = adapter(5)
    for index in range(2):
        buffer.submit(
            current=current,
            base=current,
            delta=adapter(10 + index),
            staleness=index,
            num_samples=4 + index,
            update_id=f"u{index}",
        )
    extra = {
        "k": 12,
        "variance": torch.tensor([0.5, float("nan")], dtype=torch.float64),
        "history": [(1, 2.5), {"nested": torch.ones(2, dtype=torch.bfloat16)}],
        "limits": [math.inf, -math.inf, None, "text", True],
    }
    accepted = UpdateEntry(
        update_id="u1", client_id="c", base_version=4, staleness=1, decision="accepted", version=5
    )
    merge = MergeEntry(version=5, update_ids=("u0", "u9"), commit=3)
    saved = make_checkpoint(
        3,
        5,
        states={"strategy": buffer.state_dict(), "k_controller": extra},
        answered=(accepted,),
        audit=(accepted, merge),
        counters={"merged": 9, "rejected": 2, "rejected.stale": 2},
        published_chunks={4: 2, 5: 1},
    )
    store = CheckpointStore(tmp_path)
    store.save(saved)
    loaded = load(CheckpointStore(tmp_path))
    assert (loaded.commit, loaded.version, loaded.federation, loaded.task_id) == (3, 5, FED, TASK)
    assert list(loaded.globals) == [3, 4, 5]
    for version, tensors in saved.globals.items():
        assert as_bytes(loaded.globals[version]) == as_bytes(tensors)
    restored = FedBuff(3)
    restored.load_state_dict(loaded.states["strategy"])
    assert [e.update_id for e in restored.buffered] == ["u0", "u1"]
    for mine, theirs in zip(restored.buffered, buffer.buffered, strict=True):
        assert as_bytes(mine.delta) == as_bytes(theirs.delta)
        assert (mine.weight, mine.staleness, mine.num_samples) == (
            theirs.weight,
            theirs.staleness,
            theirs.num_samples,
        )
    k = loaded.states["k_controller"]
    assert k["k"] == 12
    variance = k["variance"]
    assert isinstance(variance, torch.Tensor) and variance.dtype == torch.float64
    assert as_bytes({"v": variance}) == as_bytes({"v": extra["variance"]})  # type: ignore[dict-item]
    history = k["history"]
    assert isinstance(history, list) and history[0] == [1, 2.5]
    nested = history[1]["nested"]
    assert nested.dtype == torch.bfloat16 and torch.equal(
        nested, torch.ones(2, dtype=torch.bfloat16)
    )
    assert k["limits"] == [math.inf, -math.inf, None, "text", True]
    assert loaded.answered == (accepted,)
    assert loaded.audit == (accepted, merge)
    assert dict(loaded.counters) == {"merged": 9, "rejected": 2, "rejected.stale": 2}
    assert dict(loaded.published_chunks) == {4: 2, 5: 1}


def test_checkpoint_store_is_empty_until_the_first_save(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path / "new").load(federation=FED, task_id=TASK) is None


def test_checkpoint_interrupted_save_leaves_the_previous_one(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(make_checkpoint(1, 1))
    # A crash in the middle of the next save: new global written, manifest not renamed yet.
    write_atomic(tmp_path / "global-000000000002.safetensors", b"half-finished")
    (tmp_path / "manifest.json.tmp").write_bytes(b'{"format": "edgefed-che')
    (tmp_path / "state-000000000002.safetensors.tmp").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("an operator's file")
    loaded = load(CheckpointStore(tmp_path))
    assert (loaded.commit, loaded.version) == (1, 1)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "global-000000000000.safetensors",
        "global-000000000001.safetensors",
        "manifest.json",
        "notes.txt",
    ]


def test_checkpoint_writes_each_global_once_and_forgets_old_ones(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(make_checkpoint(1, 2))
    kept = tmp_path / "global-000000000002.safetensors"
    first_write = kept.stat().st_mtime_ns, kept.stat().st_ino
    store.save(make_checkpoint(2, 4))
    assert (kept.stat().st_mtime_ns, kept.stat().st_ino) == first_write
    assert sorted(p.name for p in tmp_path.glob("global-*")) == [
        "global-000000000002.safetensors",
        "global-000000000003.safetensors",
        "global-000000000004.safetensors",
    ]


def test_checkpoint_rewrites_a_global_left_by_an_uncommitted_save(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(make_checkpoint(1, 1))
    (tmp_path / "global-000000000002.safetensors").write_bytes(b"from a save that never committed")
    store = CheckpointStore(tmp_path)
    load(store)
    store.save(make_checkpoint(2, 2))
    assert as_bytes(load(CheckpointStore(tmp_path)).globals[2]) == as_bytes(adapter(2))


def test_checkpoint_refuses_damaged_files_and_other_federations(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(make_checkpoint(1, 1))
    with pytest.raises(ConfigError, match="holds federation 'fed'"):
        CheckpointStore(tmp_path).load(federation="other", task_id=TASK)
    path = tmp_path / "global-000000000001.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="damaged"):
        CheckpointStore(tmp_path).load(federation=FED, task_id=TASK)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        CheckpointStore(tmp_path).load(federation=FED, task_id=TASK)


def test_checkpoint_needs_the_current_global() -> None:
    with pytest.raises(ValueError, match="lacks that global"):
        Checkpoint(commit=1, federation=FED, task_id=TASK, version=3, globals={2: adapter(2)})


@pytest.mark.parametrize(
    "state",
    [
        {"bad": object()},
        {"bad": {1: "non-string key"}},
        {"$tensor": "reserved"},
        {"deep": [{"$float": "reserved too"}]},
    ],
)
def test_flatten_state_refuses_what_it_cannot_restore(state: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        flatten_state(state, "part")


def test_unflatten_state_refuses_a_missing_tensor() -> None:
    data, tensors = flatten_state({"w": torch.ones(2)}, "part")
    assert set(tensors) == {"part/w"}
    with pytest.raises(ConfigError, match="missing tensor"):
        unflatten_state(data, {})
