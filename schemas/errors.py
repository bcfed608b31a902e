"""Every error edgefed raises on purpose, in one tree.

::

    EdgeFedError
    ├── CodecError (ValueError)          bytes that are not a valid message
    │   ├── PayloadTooLarge              refused before decoding
    │   ├── SchemaVersionError           a message from an incompatible release
    │   └── ChunkError                   a chunked transfer that cannot complete
    ├── TopicError (ValueError)          a topic outside the layout of docs/architecture.md §3
    ├── TransportError                   the broker connection failed
    ├── SignatureError (ValueError)      a global model or task not signed by a trusted key
    ├── ConfigError (ValueError)         a setting that cannot work
    │   ├── AssetMissing                 packaged weights or data not installed yet
    │   └── IncompatibleLibrary          an installed library lacks what edgefed relies on
    ├── FitStopped                       a local fit asked to stop (its work is discarded)
    └── UpdateRejected                   an update the aggregator will not merge
        ├── StaleUpdate                  ... because it is older than max_staleness
        └── SplitRejected                a split-learning request the server will not serve

Errors carry their data as attributes so callers never parse messages.
"""

from __future__ import annotations

from typing import Literal

RejectReason = Literal[
    "malformed",
    "too_large",
    "schema_version",
    "unknown_client",
    "wrong_task",
    "wrong_run",
    "wrong_method",
    "too_many_samples",
    "wrong_shape",
    "wrong_dtype",
    "non_finite",
    "norm_bound",
    "wrong_proxy",
    "stale",
    "future_version",
    "not_selected",
    "duplicate",
    "internal",
]
"""Machine-readable reasons a Nack carries (see ``schemas.messages.Ack``)."""


class EdgeFedError(Exception):
    """Root of every error edgefed raises on purpose."""


class CodecError(EdgeFedError, ValueError):
    """Bytes that do not decode to a valid message; nothing partial is ever returned."""


class PayloadTooLarge(CodecError):
    """A payload over the configured limit, refused before any decoding."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"payload of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class SchemaVersionError(CodecError):
    """A message whose ``schema_version`` this release does not understand."""

    def __init__(self, found: object, supported: int) -> None:
        super().__init__(
            f"schema_version {found!r} is not supported (this release speaks {supported})"
        )
        self.found = found
        self.supported = supported


class ChunkError(CodecError):
    """A chunked transfer that is inconsistent, corrupt or expired."""

    def __init__(self, transfer_id: str, reason: str) -> None:
        super().__init__(f"transfer {transfer_id}: {reason}")
        self.transfer_id = transfer_id
        self.reason = reason


class TopicError(EdgeFedError, ValueError):
    """A topic that is not part of the layout in docs/architecture.md §3."""


class TransportError(EdgeFedError):
    """The broker could not be reached or the connection broke."""


SignatureProblem = Literal["unsigned", "bad_signature"]
"""Why a signature was refused: none at all, or one no trusted key made."""
SignedKind = Literal["global", "task"]
"""The aggregator's messages that carry a signature."""


class SignatureError(EdgeFedError, ValueError):
    """A global model or task whose signature is missing or was not made by a trusted key."""

    def __init__(
        self,
        problem: SignatureProblem,
        *,
        version: int,
        detail: str,
        subject: SignedKind = "global",
    ) -> None:
        super().__init__(f"{subject} version {version} refused ({problem}): {detail}")
        self.problem: SignatureProblem = problem
        self.version = version
        self.detail = detail
        self.subject: SignedKind = subject


class ConfigError(EdgeFedError, ValueError):
    """A configuration value that cannot work."""


class AssetMissing(ConfigError):
    """A packaged model or dataset that is not installed; ``command`` installs it."""

    def __init__(self, asset: str, detail: str, command: str) -> None:
        super().__init__(f"{asset} is not installed ({detail}); run `{command}` to install it")
        self.asset = asset
        self.detail = detail
        self.command = command


class IncompatibleLibrary(ConfigError):
    """An installed library release no longer has an attribute edgefed relies on."""

    def __init__(self, package: str, needed: str) -> None:
        from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

        try:
            found = version(package)
        except PackageNotFoundError:
            found = "not installed"
        super().__init__(
            f"{package} {found} has no {needed}, which edgefed relies on; install the "
            "locked versions (`make`, or `pip install -r requirements/lock.txt`)"
        )
        self.package = package
        self.found = found
        self.needed = needed


class FitStopped(EdgeFedError):
    """A local fit was asked to stop (the agent is shutting down); its work is discarded."""


class UpdateRejected(EdgeFedError):
    """An update the aggregator refuses; ``reason`` is what the Nack carries."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: RejectReason = reason
        self.detail = detail


class StaleUpdate(UpdateRejected):
    """An update whose base version is older than ``max_staleness`` allows."""

    def __init__(self, staleness: int, max_staleness: int) -> None:
        super().__init__(
            "stale",
            f"staleness {staleness} exceeds max_staleness {max_staleness}; refetch the global",
        )
        self.staleness = staleness
        self.max_staleness = max_staleness


class SplitRejected(UpdateRejected):
    """A split-learning request the split server refuses; the reply carries the reason."""
