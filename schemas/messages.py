"""The wire contract: every message edgefed sends, as frozen pydantic models.

Each model has a ``kind`` discriminator and a ``schema_version`` so a receiver can
tell what it holds and whether it understands it. Tensors are carried as torch
tensors here; ``schemas.codec`` turns them into msgpack ``{dtype, shape, data}``
maps without copying. Objects validate when built, so a message that exists is a
message that is valid.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.errors import RejectReason

SCHEMA_VERSION: Literal[1] = 1
"""The wire format this release speaks; bump on any incompatible change."""

Method = Literal["lora", "fwdgrad", "kd", "split"]
LoraMode = Literal["standard", "ffa"]
PerturbTarget = Literal["all", "lora_B", "head"]
"""Which adapter tensors forward-gradient training perturbs: all of them, LoRA's B only, or
only the classification head that travels with a classifier's adapter."""
AgentState = Literal["online", "waiting", "training", "offline", "cannot_fit"]
TensorMap = dict[str, torch.Tensor]
"""Named tensors: adapter weights or deltas, names without the peft adapter suffix."""

NonNegative = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(gt=0)]
Uint64 = Annotated[int, Field(ge=0, lt=2**64)]


def new_id() -> str:
    """A fresh random identifier for updates and transfers."""
    return uuid.uuid4().hex


def new_run_id() -> str:
    """A fresh run identifier that sorts after every earlier one (milliseconds, then random).

    A later run of a federation therefore wins over what an earlier run left on the broker,
    and a replayed message of an earlier run loses.
    """
    return f"{time.time_ns() // 1_000_000:013x}-{uuid.uuid4().hex[:8]}"


class WireModel(BaseModel):
    """Base of every wire object: immutable, strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


class Message(WireModel):
    """A top-level message; carries the schema version it was written with."""

    schema_version: Literal[1] = SCHEMA_VERSION


class ModelRef(WireModel):
    """Which base model every participant loads: ``tiny``, a packaged name, or a local folder."""

    name: str = Field(min_length=1)
    revision: str = ""


class LoraSpec(WireModel):
    """The adapter everyone attaches; ``ffa`` freezes A from ``seed`` so merges of B are exact."""

    rank: Positive = 8
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    mode: LoraMode = "standard"
    seed: int = 0
    head_tokens: tuple[NonNegative, ...] = ()
    """A causal LM classifier's answer tokens: their rows of the (tied) embedding and LM head
    train beside the adapter, a head of ``len x hidden`` values that forward gradients can
    estimate (the aggregator names them when a federation takes ``fwdgrad``); empty: none."""


class TrainSpec(WireModel):
    """Local training hyperparameters a device applies for one update."""

    local_steps: Positive = 5
    batch_size: Positive = 8
    seq_len: Positive = 32
    lr: float = Field(default=5e-3, gt=0)
    perturbations: Positive = 16
    """Forward-gradient perturbations per local step (``fwdgrad`` only; an Ack may override)."""


class ProxySpec(WireModel):
    """The public proxy slice KD devices compute logits on (docs/architecture.md §6 ``kd``).

    Every participant loads ``dataset`` (a ``load_data`` spec) from the same assets and keeps
    the rows at ``indices``; the aggregator picks a fresh slice per version, and an update
    names the slice it answers by ``slice_id`` so stale logits are still distilled on the
    rows they were computed for.
    """

    dataset: str = Field(min_length=1)
    indices: tuple[NonNegative, ...] = Field(min_length=1)
    slice_id: NonNegative
    """The version the slice was chosen for."""
    top_k: Positive = 8
    """Logits per scored position a device uploads (the largest ones)."""


class Task(Message):
    """What the federation is training now; published retained by the aggregator."""

    kind: Literal["task"] = "task"
    task_id: str = Field(min_length=1)
    federation: str = Field(min_length=1)
    version: NonNegative
    run_id: str = ""
    """This run of the federation (:func:`new_run_id`): a fresh aggregator starts a new one,
    one resumed from its checkpoint keeps it. Devices follow the latest run only. Empty: a
    peer from before runs existed."""
    session: str = ""
    """This start of the aggregator process, new at every start (a resumed run's too). A
    device with unanswered updates sends them again when it changes: a broker may have lost
    what it queued for the aggregator while it was away. Empty: not known."""
    global_chunks: Positive = 1
    """The topics this version's global is published on, ``global/<version>/0`` to
    ``global/<version>/<n-1>``: devices subscribe to exactly these, since some brokers
    (RabbitMQ) hand retained messages only to subscriptions without wildcards."""
    whole_updates: bool = False
    """Send each update as one MQTT message, never in chunks: intake replicas share the
    updates message by message, so one update's chunks would be split between them."""
    method: Method = "lora"
    methods: tuple[Method, ...] = ()
    """Methods a device may choose from to fit its memory budget, preferred first;
    empty: only ``method``.

    See docs/architecture.md §7.
    """
    model: ModelRef
    lora: LoraSpec = LoraSpec()
    train: TrainSpec = TrainSpec()
    dataset: str = "synthetic"
    seed: int = 0
    """Seed of the shared base model (for models built from a config) and adapter init."""
    max_staleness: NonNegative = 10
    proxy: ProxySpec | None = None
    """``kd`` only: the proxy slice devices answer with logits."""
    round_clients: tuple[str, ...] = ()
    """Synchronous rounds: the devices picked to train on this version; empty: every one."""
    created_at: float = Field(default_factory=time.time)
    signature: bytes | None = Field(default=None, min_length=64, max_length=64)
    """Ed25519 signature by the aggregator's key over ``edgefed.security.signing.task_digest`` (every
    field but ``created_at`` and this one, plus the federation). None: unsigned."""


class GlobalModel(Message):
    """The global adapter at one version; published retained, chunked when large."""

    kind: Literal["global"] = "global"
    task_id: str = Field(min_length=1)
    version: NonNegative
    run_id: str = ""
    """The run this version belongs to (``Task.run_id``)."""
    tensors: TensorMap
    created_at: float = Field(default_factory=time.time)
    signature: bytes | None = Field(default=None, min_length=64, max_length=64)
    """Ed25519 signature by the aggregator's key over ``edgefed.security.signing.global_digest``
    (federation, task_id, version and the tensors; not ``created_at``). None: unsigned."""


class SeedStep(WireModel):
    """One local forward-gradient step as seeds: which perturbations it used, what it measured.

    Perturbation k is ``v(seed, indices[k])``, regenerated over the adapter layout by
    ``edgefed.ml.perturbation``; ``d[k]`` is the directional derivative of the loss along it.
    The step applied ``-lr * scale * mean_k(d[k] * v_k)``; ``scale`` < 1 when it was clipped.
    """

    seed: Uint64
    indices: tuple[Uint64, ...] = Field(min_length=1)
    d: tuple[float, ...]
    scale: float = Field(default=1.0, gt=0, le=1)

    @model_validator(mode="after")
    def _one_derivative_per_perturbation(self) -> SeedStep:
        if len(self.d) != len(self.indices):
            raise ValueError(f"{len(self.indices)} perturbations but {len(self.d)} derivatives")
        if len(set(self.indices)) != len(self.indices):
            raise ValueError("a step uses a perturbation index twice")
        return self


class SeedDelta(WireModel):
    """A forward-gradient delta as seeds: ``sum over steps of -lr * scale * mean_k(d_k v_k)``.

    ``layout`` fingerprints the generator, the target and the adapter's names and shapes, so
    seeds are never expanded over a layout other than the one they were drawn for.
    """

    lr: float = Field(gt=0)
    target: PerturbTarget = "all"
    layout: str = Field(pattern=r"^[0-9a-f]{16}$")
    steps: tuple[SeedStep, ...] = ()


class Part(WireModel):
    """One device update inside an intake replica's pre-sum; the merger answers its device."""

    update_id: str = Field(min_length=1)
    client_id: str = Field(min_length=1)
    base_version: NonNegative
    num_samples: Positive
    staleness: NonNegative
    """Versions its base was behind the global the replica held when it took it."""


class Update(Message):
    """One device's contribution: a delta of the adapter against ``base_version``.

    The delta travels either dense (``delta``) or, for ``fwdgrad``, as seeds the aggregator
    expands (``seeds``, with ``delta`` left empty); never both. A ``kd`` update carries
    logits on a proxy slice instead of any delta.
    """

    kind: Literal["update"] = "update"
    update_id: str = Field(default_factory=new_id, min_length=1)
    client_id: str = Field(min_length=1)
    task_id: str = Field(min_length=1)
    base_version: NonNegative
    run_id: str = ""
    """The run of the global it was trained from; another run's update is ``wrong_run``."""
    num_samples: Positive
    method: Method = "lora"
    delta: TensorMap = Field(default_factory=dict)
    seeds: SeedDelta | None = None
    variance: float | None = Field(default=None, ge=0)
    """Forward gradient only: estimated variance of the per-step gradient estimate."""
    logits: TensorMap = Field(default_factory=dict)
    """``kd`` only: top-k logits on the proxy slice, ``indices`` (int) and ``values`` (fp16),
    both ``[scored positions, k]``; the update then carries no delta."""
    proxy_slice: NonNegative | None = None
    """``kd`` only: the ``ProxySpec.slice_id`` the logits were computed on."""
    train_loss: float | None = None
    compute_s: float = Field(default=0.0, ge=0)
    sent_at: float = Field(default_factory=time.time)
    parts: tuple[Part, ...] = ()
    """An intake replica's pre-sum: the device updates its delta sums, each answered by the
    merger; empty for a device's (or a site's) own update."""

    @model_validator(mode="after")
    def _dense_or_seeds(self) -> Update:
        if self.seeds is not None and self.delta:
            raise ValueError("an update carries a dense delta or seeds, not both")
        if self.logits and (self.delta or self.seeds is not None):
            raise ValueError("a kd update carries logits instead of a delta, not both")
        if bool(self.logits) != (self.proxy_slice is not None):
            raise ValueError("logits and proxy_slice come together")
        if self.parts and (self.seeds is not None or self.logits):
            raise ValueError("a pre-sum carries a dense delta")
        if len({part.update_id for part in self.parts}) != len(self.parts):
            raise ValueError("a pre-sum names each device update once")
        return self


class Ack(Message):
    """The aggregator's answer to one update: accepted, or rejected with a reason."""

    kind: Literal["ack"] = "ack"
    update_id: str = Field(min_length=1)
    client_id: str = Field(min_length=1)
    accepted: bool
    reason: RejectReason | None = None
    detail: str = ""
    version: NonNegative
    """The global version after handling the update (the new one when it merged)."""
    staleness: int | None = None
    duplicate: bool = False
    perturbations: Positive | None = None
    """Forward gradient: the perturbations per step this device should use from now on."""
    merged_before: tuple[str, ...] = ()
    """A pre-sum refused as a ``duplicate``: its parts the merger had already taken."""

    @model_validator(mode="after")
    def _rejection_has_reason(self) -> Ack:
        if not self.accepted and self.reason is None:
            raise ValueError("a rejected update must carry a reason")
        return self


class DeviceProfile(WireModel):
    """What a device tells the federation about itself."""

    name: str = ""
    memory_budget_mb: float | None = None
    relative_speed: float | None = Field(default=None, gt=0)


class Status(Message):
    """A device's presence and heartbeat; retained, with last will = offline."""

    kind: Literal["status"] = "status"
    client_id: str = Field(min_length=1)
    state: AgentState
    profile: DeviceProfile = DeviceProfile()
    plan: dict[str, str | int | float | bool] | None = None
    base_version: int | None = None
    updates_sent: NonNegative = 0
    accepted: NonNegative = 0
    rejected: NonNegative = 0
    method: Method | None = None
    """The method of the device's last update (``plan`` has the planned one, when planned)."""
    heartbeat_at: float = Field(default_factory=time.time)


class Ask(Message):
    """A device that has waited without its task or global asks the aggregator to send it.

    The answer is the same retained publication again (which also restores it on a broker
    that lost it), so brokers that never hand over retained messages still federate.
    """

    kind: Literal["ask"] = "ask"
    client_id: str = Field(min_length=1)
    missing: Literal["task", "global"]
    version: NonNegative | None = None
    """``global``: the version of the task the device holds."""


class Metrics(Message):
    """Progress of the global model, for observers and results files."""

    kind: Literal["metrics"] = "metrics"
    version: NonNegative
    time_s: float
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    merged_updates: NonNegative = 0
    rejected_updates: NonNegative = 0
    rejected_by_reason: dict[RejectReason, NonNegative] = Field(default_factory=dict)
    """Rejections so far per machine-readable reason, so operators see what is refused."""
    staleness: dict[NonNegative, NonNegative] = Field(default_factory=dict)
    """Accepted updates so far by staleness (versions behind when they arrived)."""
    bytes_received: NonNegative = 0
    """MQTT payload bytes the aggregator has received, chunks included."""
    bytes_sent: NonNegative = 0


class Chunk(Message):
    """One piece of a payload larger than ``max_payload``; reassembled by ``transfer_id``."""

    kind: Literal["chunk"] = "chunk"
    transfer_id: str = Field(min_length=1)
    index: NonNegative
    total: Positive
    size: NonNegative
    """Length of the whole reassembled payload in bytes."""
    xxh3: str = Field(pattern=r"^[0-9a-f]{16}$")
    """xxh3-64 of the whole reassembled payload: it catches corrupted and mixed-up chunks at
    a thirtieth of SHA-256's cost. Not a defence against tampering: signed globals and tasks
    carry their own signatures, and updates come over the device's authenticated link."""
    data: bytes

    @model_validator(mode="after")
    def _index_in_range(self) -> Chunk:
        if self.index >= self.total:
            raise ValueError(f"chunk index {self.index} is not below total {self.total}")
        return self


SplitVariant = Literal["vanilla", "u_shaped"]
"""Split learning: the server runs the head and sees labels, or the device keeps the head."""
SplitPhase = Literal["forward", "backward"]


class SplitRequest(Message):
    """One half-step of split learning from a device, on ``split/<client>/fwd``.

    ``forward`` carries ``tensors["hidden"]`` (activations after block ``cut``, ``[b, s, h]``),
    optionally ``tensors["attention_mask"]`` (``[b, s]``) and, in the ``vanilla`` variant,
    ``tensors["labels"]``. ``backward`` (``u_shaped`` only) carries ``tensors["grad"]``, the
    gradient of the device's loss with respect to the hidden states the server returned for
    the same ``step_id``. A retry re-sends the same ``request_id``.

    See docs/architecture.md §6.
    """

    kind: Literal["split_request"] = "split_request"
    request_id: str = Field(default_factory=new_id, min_length=1)
    step_id: str = Field(min_length=1)
    client_id: str = Field(min_length=1)
    task_id: str = Field(min_length=1)
    cut: Positive
    variant: SplitVariant = "vanilla"
    phase: SplitPhase = "forward"
    tensors: TensorMap
    choices: tuple[NonNegative, ...] = ()
    """A generative classifier's label tokens: the server scores the answer among these only,
    as the device's own trainers do; empty: against the whole vocabulary."""
    sent_at: float = Field(default_factory=time.time)

    @model_validator(mode="after")
    def _phase_has_its_tensors(self) -> SplitRequest:
        need = {"hidden"} if self.phase == "forward" else {"grad"}
        if self.phase == "forward" and self.variant == "vanilla":
            need.add("labels")
        if self.phase == "backward" and self.variant == "vanilla":
            raise ValueError("only the u_shaped variant sends a backward request")
        allowed = need | ({"attention_mask"} if self.phase == "forward" else set())
        if not need <= self.tensors.keys() <= allowed:
            raise ValueError(
                f"a {self.variant} {self.phase} request carries tensors {sorted(need)}"
                f" (and optionally attention_mask), not {sorted(self.tensors)}"
            )
        return self


class SplitReply(Message):
    """The split server's answer to one ``SplitRequest``, on ``split/<client>/bwd``.

    Accepted: ``tensors["grad"]`` (gradient for the device's activations) or, answering a
    ``u_shaped`` forward, ``tensors["hidden"]`` (the server part's output). Rejected:
    ``reason`` and ``detail`` say why, and nothing changed on the server.
    """

    kind: Literal["split_reply"] = "split_reply"
    request_id: str = Field(min_length=1)
    client_id: str = Field(min_length=1)
    accepted: bool
    reason: RejectReason | None = None
    detail: str = ""
    loss: float | None = None
    """``vanilla``: the training loss of the step, computed on the server."""
    tensors: TensorMap = Field(default_factory=dict)
    server_s: float = Field(default=0.0, ge=0)
    """Server compute time of this answer."""

    @model_validator(mode="after")
    def _rejection_has_reason(self) -> SplitReply:
        if not self.accepted and self.reason is None:
            raise ValueError("a rejected split request must carry a reason")
        if self.accepted and not self.tensors:
            raise ValueError("an accepted split reply carries a gradient or hidden states")
        return self


AnyMessage = Annotated[
    Task | GlobalModel | Update | Ack | Status | Ask | Metrics | Chunk | SplitRequest | SplitReply,
    Field(discriminator="kind"),
]
MESSAGE_TYPES: tuple[type[Message], ...] = (
    Task,
    GlobalModel,
    Update,
    Ack,
    Status,
    Ask,
    Metrics,
    Chunk,
    SplitRequest,
    SplitReply,
)
