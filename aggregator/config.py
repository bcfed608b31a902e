"""Settings of the aggregator service, read from ``aggregator.toml``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from aggregator.schedule import ScheduleName
from aggregator.staleness import StalenessName
from aggregator.strategies import Strategy, StrategyName, build_strategy, rule_for
from aggregator.strategies.fedbuff import RobustMode
from edgefed.data.text_tasks import answer_tokens
from edgefed.ml.models import TINY_MODELS, model_kind
from edgefed.ml.privacy import PrivacySettings
from edgefed.settings import CommandSettings, Settings
from edgefed.transport.connection import MqttSettings
from schemas.errors import ConfigError
from schemas.messages import LoraSpec, Method, ModelRef, ProxySpec, Task, TrainSpec

__all__ = [
    "PRETRAINED_ENCODER_KD_TRAIN",
    "PRETRAINED_ENCODER_TRAIN",
    "PRETRAINED_LM_TRAIN",
    "PRETRAINED_LORA_SERVER_LR",
    "AggregatorConfig",
    "FwdGradSettings",
    "KdSettings",
    "StalenessName",
    "StrategyName",
    "StrategySettings",
    "SyncSettings",
    "default_train",
    "task_message",
]


class StrategySettings(Settings):
    """Which merge rule runs and with what parameters (docs/architecture.md §5)."""

    name: StrategyName = "fedbuff"
    staleness: StalenessName | None = None
    """None picks the strategy's own default (FedAsync: polynomial, FedBuff: inverse_sqrt)."""
    staleness_params: dict[str, float] = Field(default_factory=dict)
    alpha: float = Field(default=0.6, gt=0, le=1)
    buffer_size: int = Field(default=3, gt=0)
    server_lr: float = Field(default=1.0, gt=0)
    schedule: ScheduleName = "cosine"
    """How the merge step changes over a run bounded by ``max_versions`` or ``max_seconds``:
    ``cosine`` decays it to ``final_lr`` times its start (see :mod:`aggregator.schedule`),
    ``constant`` keeps it; an open-ended run always keeps it."""
    final_lr: float = Field(default=0.0, ge=0, le=1)
    """The multiple of the merge step a cosine schedule ends at."""
    robust: RobustMode = "mean"
    """FedBuff only: reduce the buffer by weighted ``mean``, or coordinate-wise ``median`` or
    ``trimmed_mean``, so a few poisoned updates cannot drag the global (docs/architecture.md §5)."""
    trim_ratio: float = Field(default=0.2, ge=0, lt=0.5)
    """``trimmed_mean``: fraction of values dropped at each end of every coordinate."""

    def build(self) -> Strategy:
        """The strategy these settings describe, from the values pydantic already checked.

        Raises:
            ConfigError: What only the combination can show: rule parameters without a rule
                name, parameters the rule does not take, or a robust mode for FedAsync.
        """
        return build_strategy(
            self.name,
            rule=rule_for(self.name, self.staleness, self.staleness_params),
            alpha=self.alpha,
            buffer_size=self.buffer_size,
            server_lr=self.server_lr,
            robust=None if self.robust == "mean" else self.robust,
            trim_ratio=self.trim_ratio,
        )


class SyncSettings(Settings):
    """Classic FedAvg rounds (the ``[sync]`` table): one round per version, no stale update.

    With it the strategy defaults to FedBuff with a buffer of one round's devices and
    ``max_staleness`` to 0; devices see the rounds in the task and train once per round they
    are picked for (see :mod:`aggregator.rounds`).
    """

    clients: tuple[str, ...] = Field(min_length=1)
    """The roster: the client ids rounds draw from."""
    clients_per_round: int | None = Field(default=None, ge=1)
    """Devices drawn per round with the run's seed; None: every one of ``clients``."""
    round_deadline_s: float | None = Field(default=None, gt=0)
    """Close a round this long after it opened with whoever answered (at least one);
    None: wait for every device drawn."""

    @model_validator(mode="after")
    def _round_fits_roster(self) -> SyncSettings:
        if len(set(self.clients)) != len(self.clients):
            raise ValueError("clients must be distinct")
        if self.clients_per_round is not None and self.clients_per_round > len(self.clients):
            raise ValueError(
                f"clients_per_round {self.clients_per_round} is more than the "
                f"{len(self.clients)} clients"
            )
        return self

    @property
    def size(self) -> int:
        """Devices per round."""
        return self.clients_per_round or len(self.clients)


class FwdGradSettings(Settings):
    """Forward-gradient updates: how many perturbations to ask for and to rebuild.

    See docs/architecture.md §6.
    """

    variance_threshold: float | None = Field(default=None, gt=0)
    """Keep the merged gradient estimate's variance under this by raising or lowering the
    perturbations per step asked of devices (in Task and Ack); None keeps the task's K."""
    min_perturbations: int = Field(default=4, ge=1)
    max_perturbations: int = Field(default=256, ge=1)
    """Bounds on the K the controller asks for."""
    max_update_perturbations: int = Field(default=65_536, ge=1)
    """Most perturbations one seed update may ask the aggregator to regenerate."""


class KdSettings(Settings):
    """Knowledge distillation: the proxy slices announced and the server's distillation."""

    proxy_dataset: str = "synthetic:n=512,seed=4242"
    """Public proxy source every participant can load (a ``load_data`` spec)."""
    proxy_size: int = Field(default=64, ge=1)
    """Rows per slice; a fresh slice is drawn for every version. MiniLM on AG News (2
    devices, 240 s): 16 rows at server_lr 1e-2 peaked at 0.73 and fell back to 0.43; 64
    rows at 3e-3 reached 0.81 with the eval loss falling throughout."""
    top_k: int = Field(default=8, ge=1)
    """Logits per scored position a device uploads."""
    temperature: float = Field(default=2.0, gt=0)
    server_steps: int = Field(default=8, ge=1)
    """AdamW steps of distillation per merge."""
    server_lr: float = Field(default=3e-3, gt=0)


PRETRAINED_ENCODER_TRAIN = TrainSpec(seq_len=64, lr=1e-3)
"""A pretrained encoder's task defaults (MiniLM with a fresh head). 32 tokens cut four in
five AG News rows (44 tokens on average, 58 at the 90th percentile), and at 5e-3 AdamW
overshoots: centralized LoRA on AG News fell from 0.83 to 0.67-0.73 by step 500, where
1e-3 climbed to 0.84-0.86."""

PRETRAINED_ENCODER_KD_TRAIN = PRETRAINED_ENCODER_TRAIN.model_copy(update={"seq_len": 32})
"""A pretrained encoder's defaults when the federation distills (KD). Per version, KD on
AG News learned as much at 32 tokens as at 64, and each version took 1.6x as long at 64:
in 240 s, 0.790 held-out accuracy at version 8 against 0.702 at version 5."""

PRETRAINED_LM_TRAIN = TrainSpec(local_steps=10, batch_size=8, seq_len=64, lr=5e-4)
"""A pretrained causal LM's task defaults (SmolLM2; the demo's settings). At the general
default of 5e-3 and 32 tokens, LoRA on Rotten Tomatoes went 0.70 -> 0.61 by version 2 and
split swung between 0.64 and 0.75: a pretrained model needs small steps, and 32 tokens cut
most reviews."""


PRETRAINED_LORA_SERVER_LR = 2.0
"""FedBuff's merge step when a pretrained model federates LoRA alone (asynchronously).

A buffer averages three fits that started from nearly the same global, so at a merge step
of 1 the global moves about one fit's worth per three device fits. MiniLM on AG News, 2
devices, 480 s, the whole test split (7,600 rows): 1.0 gave 0.872 after 600 device steps and
0.876 after 1,200; 2.0 gave 0.884 and 0.887, where centralized LoRA reached 0.882 at 500
steps and 0.883 at 1,000. The demo measured the same on SmolLM2 (see ``simulator.demo``)."""


def default_train(model: ModelRef | str, method: Method = "lora") -> TrainSpec:
    """The task's training defaults for ``model``'s family and the federation's ``method``.

    The random tiny models keep ``TrainSpec()``; a pretrained encoder gets
    :data:`PRETRAINED_ENCODER_TRAIN` (:data:`PRETRAINED_ENCODER_KD_TRAIN` when it distills),
    a pretrained causal LM :data:`PRETRAINED_LM_TRAIN`.
    A model that cannot be read keeps the general defaults (loading it reports the problem).
    """
    name = model.name if isinstance(model, ModelRef) else model
    if name in TINY_MODELS:
        return TrainSpec()
    try:
        kind = model_kind(model)
    except ConfigError:  # AssetMissing included
        return TrainSpec()
    if kind == "causal":
        return PRETRAINED_LM_TRAIN
    return PRETRAINED_ENCODER_KD_TRAIN if method == "kd" else PRETRAINED_ENCODER_TRAIN


class AggregatorConfig(CommandSettings):
    """Everything one aggregator needs to run a federation."""

    federation: str
    task_id: str = "task-1"
    method: Method = "lora"
    accept_methods: tuple[Method, ...] = ()
    """Methods accepted besides ``method``: those whose result is a delta of the same adapter
    (lora, fwdgrad) can share one federation."""
    model: ModelRef = ModelRef(name="tiny")
    lora: LoraSpec = LoraSpec()
    train: TrainSpec = TrainSpec()
    """Fields left out come from the model family's defaults (:func:`default_train`)."""
    strategy: StrategySettings = StrategySettings()
    fwdgrad: FwdGradSettings = FwdGradSettings()
    kd: KdSettings = KdSettings()
    seed: int = 0
    """Seed of the shared base model and adapter initialisation."""
    max_staleness: int = Field(default=10, ge=0)
    max_update_norm: float | None = Field(default=None, gt=0)
    """Per-update L2 norm bound: a scaled-up (poisoned or diverged) delta is clipped to it or,
    with ``norm_action = "reject"``, nacked (reason ``norm_bound``). None: no bound."""
    norm_action: Literal["clip", "reject"] = "clip"
    max_samples_per_update: int | None = Field(default=None, gt=0)
    """Largest ``num_samples`` (an update's merge weight) accepted; above it the update is
    nacked (reason ``too_many_samples``). None: ``train.local_steps * train.batch_size``."""
    dataset: str = "synthetic"
    """What the federation trains on, announced in the task (agents size a classifier's head
    from it); agents bring their own part of it."""
    eval_data: str = "synthetic:n=256,seed=999"
    eval_every: int = Field(default=1, ge=0)
    """Score every this many versions on ``eval_data`` (version 0 included); 0 scores only
    the last version of a run bounded by ``max_versions`` (a caller that scores snapshots
    itself keeps the cores for training)."""
    max_versions: int = Field(default=0, ge=0)
    """Stop after this many versions (0 = run until stopped)."""
    max_seconds: float = Field(default=0.0, ge=0)
    """Stop merging this many seconds after start (0 = no time limit); with ``max_versions``,
    whichever comes first. Either bound is the length a ``cosine`` schedule decays over."""
    max_payload: int = Field(default=256 * 1024, ge=4096)
    max_message_bytes: int = Field(default=64 * 1024 * 1024, ge=4096)
    """Largest update accepted (all chunks together), refused before any decoding."""
    known_clients: frozenset[str] | None = None
    """Client ids allowed to contribute; None accepts any client."""
    checkpoint_dir: str | None = None
    """Folder of crash-safe checkpoints; the service resumes from it. None: memory only."""
    checkpoint_every: int = Field(default=1, ge=1)
    """Buffered (not yet merged) accepted updates per checkpoint; a merge always checkpoints."""
    checkpoint_max_delay_s: float = Field(default=1.0, gt=0)
    """Longest an ack of a buffered update waits for its checkpoint."""
    audit_log: str | None = None
    """JSONL audit log; defaults to ``audit.jsonl`` in ``checkpoint_dir`` when that is set."""
    json_out: str | None = None
    """``edgefed aggregator`` writes the run's results (versions, evaluations, every update's
    answer) to this JSON file when it stops."""
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Serve Prometheus metrics on ``http://<metrics_host>:<port>/metrics`` (0: a free port,
    logged). None: no endpoint."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics endpoint listens on; ``0.0.0.0`` lets another host scrape it."""
    mqtt: MqttSettings = MqttSettings()
    """Broker URL, TLS files and identity (the ``[mqtt]`` table); secrets only from files/env."""
    split_mqtt: MqttSettings | None = None
    """The split server's own login (``[split_mqtt]``; ``url`` defaults to the aggregator's
    broker). A broker that makes the user name the client id (production.conf) needs it: a
    second login as the aggregator would close the aggregator's connection. None: the split
    server logs in as ``[mqtt]`` says, with a client id of its own."""
    signing_key: str | None = None
    """PEM Ed25519 private key: every published global and task is signed with it."""
    privacy: PrivacySettings | None = None
    """Central client-level DP (FedBuff, ``robust = "mean"``): updates clipped to
    ``clip_norm``, Gaussian noise on every merged buffer; (ε, δ) reported in the results."""
    init_adapter: str | None = None
    """A PEFT adapter folder (``adapter_config.json`` and weights) a fresh run starts from
    instead of a new adapter: its rank, alpha and target modules must be ``[lora]``'s. A
    run resumed from ``checkpoint_dir`` goes on from its checkpoint instead."""
    sync: SyncSettings | None = None
    """Synchronous FedAvg rounds instead of asynchronous merging; None: asynchronous."""
    role: Literal["root", "site", "intake"] = "root"
    """``site``: merge this site's devices and send one update to the root at ``[upstream]``,
    relaying the root's task and globals to the devices. ``intake``: one of several intake
    replicas beside a root with ``intake = "replicas"`` (docs/scaling-out.md)."""
    upstream: MqttSettings | None = None
    """A site's connection to the root broker (the ``[upstream]`` table)."""
    site_id: str | None = None
    """A site's (or intake replica's) client id at the root: a site's updates go to
    ``update/<site_id>`` there, a replica's pre-sums to ``intake/<site_id>``."""
    site_resend_s: float = Field(default=15.0, gt=0)
    """How long a site waits for the root's answer before it sends an update again."""
    intake: Literal["direct", "replicas"] = "direct"
    """A root's intake: ``replicas`` leaves the devices' updates to intake replicas sharing
    them (``$share/<intake_group>/...``) and merges the replicas' pre-sums."""
    intake_group: str = "edgefed"
    """The shared subscription group of a federation's intake replicas."""
    presum_size: int = Field(default=8, ge=1)
    """Device updates an intake replica sums into one pre-sum (fewer after ``presum_delay_s``)."""
    presum_delay_s: float = Field(default=0.5, gt=0)
    """Longest a device update waits in an intake replica before its pre-sum goes out."""
    sites: frozenset[str] = frozenset()
    """The root's site aggregators: their updates may claim every sample their devices
    trained on, where a device's are capped (``max_samples_per_update``)."""

    @model_validator(mode="before")
    @classmethod
    def _sync_defaults(cls, data: Any) -> Any:
        """With ``[sync]``, a FedBuff buffer of one round and no staleness, unless given."""
        if not isinstance(data, dict) or not isinstance(data.get("sync"), dict | SyncSettings):
            return data
        try:
            sync = SyncSettings.model_validate(data["sync"])
        except ValueError:
            return data  # field validation names the problem
        strategy = data.get("strategy", {})
        if isinstance(strategy, dict):
            data = data | {"strategy": {"name": "fedbuff", "buffer_size": sync.size} | strategy}
        return {"max_staleness": 0} | data

    @model_validator(mode="after")
    def _sync_is_consistent(self) -> AggregatorConfig:
        sync = self.sync
        if sync is None:
            return self
        if self.strategy.name != "fedbuff" or self.strategy.buffer_size != sync.size:
            raise ValueError(
                f"[sync] rounds of {sync.size} need strategy fedbuff with buffer_size "
                f"{sync.size} (leave [strategy] name and buffer_size out to get them)"
            )
        if self.max_staleness != 0:
            raise ValueError("[sync] rounds need max_staleness 0 (leave it out to get it)")
        return self

    @model_validator(mode="after")
    def _site_is_complete(self) -> AggregatorConfig:
        if self.role == "root":
            return self
        if self.role == "intake" and not self.site_id:
            raise ValueError('role = "intake" needs a site_id, the replica\'s client id')
        if self.role == "site" and (
            self.upstream is None or self.upstream.url is None or not self.site_id
        ):
            raise ValueError('role = "site" needs site_id and an [upstream] table with a url')
        methods = {self.method, *self.accept_methods}
        if not methods <= {"lora", "fwdgrad"} or self.sync is not None:
            raise ValueError(
                f"a {self.role} merges delta updates (lora, fwdgrad) asynchronously; "
                f"{sorted(methods)}{' with [sync]' if self.sync else ''} needs the root itself"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _family_defaults(cls, data: Any) -> Any:
        """Fill in what the model's family decides and the user left out.

        The ``train`` fields not given come from :func:`default_train`. A pretrained causal
        LM classifier that may train by forward gradients gets a head: its answer rows
        (``LoraSpec.head_tokens``) train beside the adapter, unless the adapter names its own.
        """
        if not isinstance(data, dict):
            return data
        model = data.get("model", cls.model_fields["model"].default)
        if isinstance(model, dict):
            model = ModelRef.model_validate(model)
        if not isinstance(model, ModelRef | str):
            return data  # field validation names the problem
        family = default_train(model, data.get("method", "lora"))
        given = data.get("train") or {}
        if isinstance(given, dict):
            data = data | {"train": family.model_dump() | given}
        data = _lora_merge_step(data, pretrained=family != TrainSpec())
        methods = {data.get("method", "lora"), *data.get("accept_methods", ())}
        if "fwdgrad" not in methods or family != PRETRAINED_LM_TRAIN:
            return data
        lora = data.get("lora", LoraSpec())
        lora = lora if isinstance(lora, LoraSpec) else LoraSpec.model_validate(lora)
        name = model.name if isinstance(model, ModelRef) else model
        tokens = answer_tokens(str(data.get("dataset", "synthetic")), name)
        if lora.head_tokens or not tokens:
            return data
        return data | {"lora": lora.model_copy(update={"head_tokens": tokens})}


def task_message(
    config: AggregatorConfig,
    *,
    version: int,
    run_id: str,
    session: str,
    global_chunks: int,
    perturbations: int | None,
    proxy: ProxySpec | None,
) -> Task:
    """The task ``config`` describes at ``version``, as the aggregator publishes it."""
    train = config.train
    if perturbations is not None:
        train = train.model_copy(update={"perturbations": perturbations})
    return Task(
        task_id=config.task_id,
        federation=config.federation,
        version=version,
        run_id=run_id,
        session=session,
        global_chunks=global_chunks,
        whole_updates=config.intake == "replicas",
        method=config.method,
        methods=(config.method, *config.accept_methods),
        model=config.model,
        lora=config.lora,
        train=train,
        max_staleness=config.max_staleness,
        dataset=config.dataset,
        seed=config.seed,
        proxy=proxy,
    )


def _lora_merge_step(data: dict[str, Any], *, pretrained: bool) -> dict[str, Any]:
    """The merge step of a pretrained model's asynchronous LoRA-only FedBuff, filled in.

    :data:`PRETRAINED_LORA_SERVER_LR` where ``[strategy]`` leaves ``server_lr`` out; any
    other federation's ``data`` is returned as it is.
    """
    strategy = data.get("strategy", {})
    lora_only = data.get("method", "lora") == "lora" and not data.get("accept_methods")
    if (
        not pretrained
        or not lora_only
        or data.get("role", "root") != "root"  # a site's sum is scaled once, by the root
        or data.get("sync") is not None
        or not isinstance(strategy, dict)
        or strategy.get("name", "fedbuff") != "fedbuff"
        or "server_lr" in strategy
    ):
        return data
    return data | {"strategy": strategy | {"server_lr": PRETRAINED_LORA_SERVER_LR}}
