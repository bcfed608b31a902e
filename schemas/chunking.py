"""Chunked transfers: payloads larger than a broker's message limit, split and put back.

Many managed brokers cap a message at 128 KiB-1 MiB, so an encoded message larger than
``max_payload`` travels as several encoded :class:`~schemas.messages.Chunk` messages that
share a ``transfer_id`` and carry the whole payload's size and xxh3-64 checksum. The receiver
feeds every chunk to a :class:`Reassembler`, which tolerates reordering and duplicates,
checks the checksum once on the whole payload, and forgets transfers that stall.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final, NoReturn

import xxhash

from schemas.codec import DEFAULT_MAX_MESSAGE_BYTES, encode
from schemas.errors import ChunkError, ConfigError
from schemas.messages import Chunk, new_id

DEFAULT_MAX_PAYLOAD: Final = 256 * 1024
"""Default largest encoded message on the wire (docs/architecture.md §4)."""

_INDEX_SLACK: Final = 2 * 4 + 3
"""Bytes an encoded chunk can grow by beyond the template: index and total up to uint32
(4 more bytes each than a fixint) and the bin header of the data (3 more than bin8)."""

_REMEMBER_COMPLETED: Final = 4096
"""Completed transfer ids kept at most, so late duplicates are recognised."""


def split_payload(
    payload: bytes | memoryview,
    *,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    transfer_id: str | None = None,
) -> list[Chunk]:
    """Split ``payload`` into chunks whose *encoded* form is at most ``max_payload`` bytes.

    Always returns at least one chunk (an empty payload gives one empty chunk): callers
    decide to split, and only do so when ``len(payload) > max_payload``; a payload that
    fits is published as it is.

    Raises:
        ConfigError: ``max_payload`` leaves no room for data next to a chunk's own fields.
    """
    view, template, room, total = _plan(payload, max_payload, transfer_id)
    return [
        Chunk(
            transfer_id=template.transfer_id,
            index=index,
            total=total,
            size=template.size,
            xxh3=template.xxh3,
            data=view[index * room : (index + 1) * room].tobytes(),
        )
        for index in range(total)
    ]


def encode_chunks(
    payload: bytes | memoryview,
    *,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    transfer_id: str | None = None,
) -> tuple[int, Iterator[bytes]]:
    """The chunk count and the encoded chunks of ``payload``, as :func:`split_payload` cuts them.

    The frames are encoded lazily, one at a time, and each chunk's data goes from a view
    on ``payload`` straight into its frame: the frame is the only copy. The fields were
    validated once on the template, so the per-chunk messages are built without it.

    Raises:
        ConfigError: as :func:`split_payload`.
    """
    view, template, room, total = _plan(payload, max_payload, transfer_id)
    fields = template.__dict__

    def frames() -> Iterator[bytes]:
        for index in range(total):
            data = view[index * room : (index + 1) * room]
            yield encode(Chunk.model_construct(**(fields | {"index": index, "data": data})))

    return total, frames()


def _plan(
    payload: bytes | memoryview, max_payload: int, transfer_id: str | None
) -> tuple[memoryview, Chunk, int, int]:
    """The payload's bytes, a validated chunk template, the data room per chunk and the count."""
    view = memoryview(payload).cast("B")
    size = view.nbytes
    tid = transfer_id if transfer_id is not None else new_id()
    template = Chunk(transfer_id=tid, index=0, total=1, size=size, xxh3=checksum(view), data=b"")
    room = max_payload - len(encode(template)) - _INDEX_SLACK
    if room <= 0:
        raise ConfigError(f"max_payload {max_payload} leaves no room for chunk data")
    total = max(1, -(-size // room))
    return view, template.model_copy(update={"total": total}), room, total


def checksum(payload: bytes | memoryview) -> str:
    """The chunk format's checksum of a whole payload: xxh3-64, as 16 hex digits."""
    return xxhash.xxh3_64_hexdigest(payload)


@dataclass(slots=True)
class _Transfer:
    """Chunks received so far for one transfer id, and what they must add up to."""

    total: int
    size: int
    xxh3: str
    last_seen: float
    parts: dict[int, bytes] = field(default_factory=dict)
    received: int = 0


class Reassembler:
    """Puts chunked payloads back together; one instance per receiving loop (not thread-safe).

    ``add`` returns the whole payload when a transfer's last missing chunk arrives.
    Chunks may come in any order and more than once. A transfer whose chunks disagree,
    that would exceed ``max_transfer_bytes`` or whose digest does not match raises
    :class:`~schemas.errors.ChunkError` and is forgotten; one that receives nothing for
    ``ttl_s`` is dropped by ``expire`` (idle time, so a slow link that keeps delivering
    is not cut off). Completed ids are remembered for ``ttl_s`` so a late duplicate chunk
    is ignored instead of starting the transfer over; a failed transfer is forgotten, so
    a sender may retry under the same id. Every chunk but an empty payload's one carries
    at least one byte, so ``total`` may not exceed ``size``.
    """

    def __init__(
        self,
        *,
        ttl_s: float = 60.0,
        max_transfer_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0 or max_transfer_bytes < 0:
            raise ConfigError("ttl_s must be positive and max_transfer_bytes non-negative")
        self.ttl_s = ttl_s
        self.max_transfer_bytes = max_transfer_bytes
        self._clock = clock
        self._transfers: dict[str, _Transfer] = {}
        self._completed: OrderedDict[str, float] = OrderedDict()

    @property
    def pending(self) -> int:
        """Transfers started and not yet complete."""
        return len(self._transfers)

    def add(self, chunk: Chunk) -> bytes | None:
        """Take one chunk; the whole payload once the transfer is complete, else ``None``.

        Raises:
            ChunkError: the transfer is inconsistent, too large or corrupt; it is forgotten.
        """
        now = self._clock()
        self._forget_completed(now)
        tid = chunk.transfer_id
        if tid in self._completed:
            return None
        transfer = self._transfers.get(tid)
        if transfer is None:
            transfer = self._start(chunk, now)
        elif (chunk.total, chunk.size, chunk.xxh3) != (
            transfer.total,
            transfer.size,
            transfer.xxh3,
        ):
            self._fail(tid, "chunks disagree on total, size or checksum")
        transfer.last_seen = now
        known = transfer.parts.get(chunk.index)
        if known is not None:
            if known != chunk.data:
                self._fail(tid, f"chunk {chunk.index} arrived twice with different data")
            return None
        transfer.received += len(chunk.data)
        if transfer.received > transfer.size:
            self._fail(tid, f"chunks hold more than the announced {transfer.size} bytes")
        transfer.parts[chunk.index] = chunk.data
        if len(transfer.parts) < transfer.total:
            return None
        return self._finish(tid, transfer, now)

    def expire(self) -> list[ChunkError]:
        """Drop transfers idle for ``ttl_s`` or longer; one error each, for the caller to log."""
        now = self._clock()
        self._forget_completed(now)
        errors: list[ChunkError] = []
        for tid, transfer in list(self._transfers.items()):
            if now - transfer.last_seen >= self.ttl_s:
                del self._transfers[tid]
                errors.append(
                    ChunkError(
                        tid,
                        f"expired after {self.ttl_s:g}s idle with "
                        f"{len(transfer.parts)} of {transfer.total} chunks",
                    )
                )
        return errors

    def _start(self, chunk: Chunk, now: float) -> _Transfer:
        if chunk.size > self.max_transfer_bytes:
            raise ChunkError(
                chunk.transfer_id,
                f"announced size {chunk.size} exceeds the limit of {self.max_transfer_bytes}",
            )
        if chunk.total > max(1, chunk.size):
            raise ChunkError(
                chunk.transfer_id, f"{chunk.total} chunks cannot carry {chunk.size} bytes"
            )
        transfer = _Transfer(total=chunk.total, size=chunk.size, xxh3=chunk.xxh3, last_seen=now)
        self._transfers[chunk.transfer_id] = transfer
        return transfer

    def _finish(self, tid: str, transfer: _Transfer, now: float) -> bytes:
        del self._transfers[tid]
        payload = b"".join(transfer.parts[i] for i in range(transfer.total))
        if len(payload) != transfer.size:
            raise ChunkError(tid, f"reassembled {len(payload)} bytes, expected {transfer.size}")
        if checksum(payload) != transfer.xxh3:
            raise ChunkError(tid, "the reassembled payload's xxh3 checksum does not match")
        self._completed[tid] = now
        while len(self._completed) > _REMEMBER_COMPLETED:
            self._completed.popitem(last=False)
        return payload

    def _fail(self, tid: str, reason: str) -> NoReturn:
        del self._transfers[tid]
        raise ChunkError(tid, reason)

    def _forget_completed(self, now: float) -> None:
        while self._completed:
            tid, finished = next(iter(self._completed.items()))
            if now - finished < self.ttl_s:
                break
            del self._completed[tid]
