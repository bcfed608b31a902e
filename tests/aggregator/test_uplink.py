"""A site's updates to the root: made once, sent until answered, kept across a checkpoint."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from aggregator.checkpoint import Checkpoint, CheckpointStore, flatten_state, unflatten_state
from aggregator.uplink import Uplink
from edgefed.transport.frames import Delivery
from edgefed.transport.memory import MemoryBroker, MemoryTransport
from schemas import topics
from schemas.errors import ConfigError
from schemas.messages import Ack, TensorMap, Update
from tests.edgefed.transport_helpers import assert_silent, receive

FED, SITE = "fed", "site-a"
RESEND_S = 0.05
"""Small enough to wait out in a test, large enough that two calls in a row fall inside it."""


def delta(seed: int) -> TensorMap:
    generator = torch.Generator().manual_seed(seed)
    return {
        "layer.lora_A": torch.randn(2, 3, generator=generator),
        "layer.lora_B": torch.randn(3, 2, generator=generator).to(torch.bfloat16),
    }


def make(uplink: Uplink, seed: int = 0, **changes: object) -> Update:
    fields: dict[str, object] = {
        "task_id": "task-1",
        "run_id": "run-1",
        "method": "lora",
        "base_version": 4,
        "delta": delta(seed),
        "num_samples": 96,
    }
    return uplink.make(**(fields | changes))  # type: ignore[arg-type]


def ack(update: Update, *, accepted: bool = True, duplicate: bool = False) -> Ack:
    return Ack(
        update_id=update.update_id,
        client_id=SITE,
        accepted=accepted,
        reason=None if accepted else "stale",
        version=5,
        duplicate=duplicate,
    )


def same_tensors(left: TensorMap, right: TensorMap) -> bool:
    return list(left) == list(right) and all(
        left[name].dtype == right[name].dtype and torch.equal(left[name], right[name])
        for name in left
    )


def assert_same_pending(restored: Uplink, original: Uplink) -> None:
    assert list(restored.pending) == list(original.pending)
    for update_id, update in original.pending.items():
        again = restored.pending[update_id]
        fields = ("update_id", "client_id", "task_id", "run_id", "base_version")
        more = ("num_samples", "method")
        for field in (*fields, *more):
            assert getattr(again, field) == getattr(update, field), field
        assert same_tensors(again.delta, update.delta)
    assert (restored.accepted, restored.refused) == (original.accepted, original.refused)


async def published(root: MemoryTransport, count: int) -> list[Update]:
    """The next ``count`` updates ``root`` receives on the site's update topic."""
    updates: list[Update] = []
    for item in await receive(root, count, timeout_s=2.0):
        assert isinstance(item, Delivery), item
        assert item.topic == topics.update(FED, SITE)
        assert isinstance(item.message, Update)
        updates.append(item.message)
    return updates


async def connected(broker: MemoryBroker) -> tuple[MemoryTransport, MemoryTransport]:
    """The site's transport and the root's, subscribed to the site's update topic."""
    site = await broker.transport(SITE).__aenter__()
    root = await broker.transport("root").__aenter__()
    await root.subscribe(topics.update(FED, SITE))
    return site, root


def test_make_holds_a_pending_update_sent_as_the_site() -> None:
    broker = MemoryBroker()
    uplink = Uplink(broker.transport(SITE), FED, SITE, resend_after_s=RESEND_S)
    given = delta(1)
    given["layer.lora_A"] = given["layer.lora_A"].t()  # not contiguous
    update = make(uplink, delta=given, method="fwdgrad", base_version=7, num_samples=500)
    assert (update.client_id, update.task_id, update.run_id) == (SITE, "task-1", "run-1")
    assert (update.base_version, update.num_samples, update.method) == (7, 500, "fwdgrad")
    assert same_tensors(update.delta, given)
    assert all(tensor.is_contiguous() for tensor in update.delta.values())
    assert list(uplink.pending.items()) == [(update.update_id, update)]
    other = make(uplink, seed=2)
    assert list(uplink.pending) == [update.update_id, other.update_id]
    assert other.update_id != update.update_id
    assert broker.frames == []  # made, not sent: the caller checkpoints first
    assert (uplink.accepted, uplink.refused) == (0, 0)


async def test_send_due_publishes_each_pending_update_once_until_it_is_due_again() -> None:
    site, root = await connected(MemoryBroker())
    uplink = Uplink(site, FED, SITE, resend_after_s=RESEND_S)
    first, second = make(uplink, seed=1), make(uplink, seed=2)
    await uplink.send_due()
    sent = await published(root, 2)
    assert [update.update_id for update in sent] == [first.update_id, second.update_id]
    assert same_tensors(sent[0].delta, first.delta)
    assert sent[0].client_id == SITE and sent[0].num_samples == first.num_samples
    frames = site.stats.published_frames
    await uplink.send_due()  # at once: nothing is due
    assert site.stats.published_frames == frames
    await assert_silent(root, timeout_s=RESEND_S / 5)
    await asyncio.sleep(RESEND_S * 2)
    await uplink.send_due()
    again = await published(root, 2)
    assert [update.update_id for update in again] == [first.update_id, second.update_id]
    await site.aclose()
    await root.aclose()


async def test_a_new_update_goes_out_at_once_while_an_older_one_waits() -> None:
    site, root = await connected(MemoryBroker())
    uplink = Uplink(site, FED, SITE, resend_after_s=60.0)
    old = make(uplink, seed=1)
    await uplink.send_due()
    assert [u.update_id for u in await published(root, 1)] == [old.update_id]
    new = make(uplink, seed=2)
    await uplink.send_due()
    assert [u.update_id for u in await published(root, 1)] == [new.update_id]
    await uplink.send_due()
    await assert_silent(root, timeout_s=0.05)
    await site.aclose()
    await root.aclose()


async def test_answers_remove_pending_updates_and_are_counted() -> None:
    site, root = await connected(MemoryBroker())
    uplink = Uplink(site, FED, SITE, resend_after_s=RESEND_S)
    kept, refused, repeated, open_ = (make(uplink, seed=seed) for seed in range(4))
    await uplink.send_due()
    await published(root, 4)
    assert uplink.answer(ack(kept))
    assert uplink.answer(ack(refused, accepted=False))
    assert uplink.answer(ack(repeated, duplicate=True))  # the root had merged it already
    assert list(uplink.pending) == [open_.update_id]
    assert (uplink.accepted, uplink.refused) == (2, 1)
    assert not uplink.answer(ack(kept))  # answered already
    unknown = Ack(update_id="never-made", client_id=SITE, accepted=True, version=5)
    assert not uplink.answer(unknown)
    assert (uplink.accepted, uplink.refused) == (2, 1)
    await asyncio.sleep(RESEND_S * 2)
    await uplink.send_due()  # only the unanswered one goes out again
    assert [u.update_id for u in await published(root, 1)] == [open_.update_id]
    await assert_silent(root, timeout_s=0.05)
    await site.aclose()
    await root.aclose()


async def test_a_failed_publish_keeps_the_update_pending_for_a_later_send() -> None:
    broker = MemoryBroker()
    site = broker.transport(SITE)  # not connected yet: publish raises TransportError
    uplink = Uplink(site, FED, SITE, resend_after_s=RESEND_S)
    update = make(uplink)
    await uplink.send_due()  # logged, not raised
    assert list(uplink.pending) == [update.update_id]
    assert broker.frames == []
    async with site, broker.transport("root") as root:
        await root.subscribe(topics.update(FED, SITE))
        await asyncio.sleep(RESEND_S * 2)
        await uplink.send_due()
        assert [u.update_id for u in await published(root, 1)] == [update.update_id]


async def test_an_update_whose_publish_failed_is_not_yet_sent_and_goes_out_next_time() -> None:
    broker = MemoryBroker()
    site = broker.transport(SITE)
    uplink = Uplink(site, FED, SITE, resend_after_s=60.0)
    update = make(uplink)
    await uplink.send_due()  # TransportError: never sent
    async with site, broker.transport("root") as root:
        await root.subscribe(topics.update(FED, SITE))
        await uplink.send_due()
        assert [u.update_id for u in await published(root, 1)] == [update.update_id]


def answered_uplink() -> Uplink:
    """Two pending updates of different fields and dtypes, one accepted, one refused."""
    uplink = Uplink(MemoryBroker().transport(SITE), FED, SITE, resend_after_s=RESEND_S)
    make(uplink, seed=1, method="fwdgrad", base_version=0, num_samples=1)
    uplink.answer(ack(make(uplink, seed=2)))
    make(uplink, seed=3, run_id="run-2", task_id="task-2", base_version=9, num_samples=4096)
    uplink.answer(ack(make(uplink, seed=4), accepted=False))
    return uplink


def fresh() -> Uplink:
    return Uplink(MemoryBroker().transport(SITE), FED, SITE, resend_after_s=RESEND_S)


def test_state_dict_round_trips_pending_updates_and_counts() -> None:
    original = answered_uplink()
    assert len(original.pending) == 2 and (original.accepted, original.refused) == (1, 1)
    restored = fresh()
    make(restored, seed=9)  # replaced by the loaded state, not added to
    restored.load_state_dict(original.state_dict())
    assert_same_pending(restored, original)
    assert fresh().state_dict() == {"pending": [], "accepted": 0, "refused": 0}
    empty = fresh()
    empty.load_state_dict({})
    assert (list(empty.pending), empty.accepted, empty.refused) == ([], 0, 0)


async def test_restored_updates_are_all_sent_again_at_once() -> None:
    original = answered_uplink()
    site, root = await connected(MemoryBroker())
    restored = Uplink(site, FED, SITE, resend_after_s=60.0)
    restored.load_state_dict(original.state_dict())
    await restored.send_due()
    assert [u.update_id for u in await published(root, 2)] == list(original.pending)
    await site.aclose()
    await root.aclose()


def test_state_dict_round_trips_through_the_checkpoint_encoding() -> None:
    original = answered_uplink()
    data, tensors = flatten_state(original.state_dict(), "uplink")
    assert len(tensors) == 4  # two tensors in each of two pending updates
    data = json.loads(json.dumps(data))  # the manifest holds it as JSON
    state = unflatten_state(data, tensors)
    assert isinstance(state, dict)
    restored = fresh()
    restored.load_state_dict(state)
    assert_same_pending(restored, original)


def test_state_dict_round_trips_through_a_checkpoint_on_disk(tmp_path: Path) -> None:
    original = answered_uplink()
    store = CheckpointStore(tmp_path)
    store.save(
        Checkpoint(
            commit=1,
            federation=FED,
            task_id="task-1",
            version=0,
            globals={0: delta(0)},
            states={"uplink": original.state_dict()},
        )
    )
    loaded = CheckpointStore(tmp_path).load(federation=FED, task_id="task-1")
    assert loaded is not None
    restored = fresh()
    restored.load_state_dict(loaded.states["uplink"])
    assert_same_pending(restored, original)


def good_item() -> dict[str, object]:
    state = answered_uplink().state_dict()
    items = state["pending"]
    assert isinstance(items, list)
    item = items[0]
    assert isinstance(item, dict)
    return item


@pytest.mark.parametrize(
    "state",
    [
        {"pending": "not a list"},
        {"pending": [5]},
        {"pending": [good_item() | {"tensors": ["not a tensor", "nor this"]}]},
        {"pending": [good_item() | {"names": ["only-one"]}]},  # names and tensors differ
        {"pending": [{key: v for key, v in good_item().items() if key != "update_id"}]},
        {"pending": [good_item() | {"num_samples": 0}]},
        {"pending": [good_item() | {"method": "bogus"}]},
        {"pending": [good_item() | {"base_version": -1}]},
        {"pending": [], "accepted": "3"},
        {"pending": [], "refused": 1.5},
    ],
    ids=[
        "pending-not-a-list",
        "item-not-a-mapping",
        "not-tensors",
        "names-tensors-mismatch",
        "missing-update-id",
        "no-samples",
        "unknown-method",
        "negative-version",
        "accepted-not-int",
        "refused-not-int",
    ],
)
def test_a_malformed_state_is_a_config_error(state: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        fresh().load_state_dict(state)
