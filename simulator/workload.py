"""What a simulated fleet trains on, and how its final global model is checked and exported.

Text data is read and tokenized once for the whole fleet, then split with a partitioner
(IID, Dirichlet by label, or size skew), so every agent gets its own rows and no row is
shared. The synthetic task keeps its uneven synthetic shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from edgefed.data.loading import load_data
from edgefed.data.sources import Partition, is_text_spec, load_examples, num_labels, partition
from edgefed.data.synthetic import synthetic_shards
from edgefed.data.text_tasks import encode
from edgefed.ml.evaluation import EvalResult, evaluate
from edgefed.ml.models import (
    attach_lora,
    build_model,
    export_adapter,
    load_tokenizer,
    model_kind,
    set_adapter,
)
from edgefed.ml.tokens import TokenDataset
from schemas.messages import LoraSpec, ModelRef, TensorMap


@dataclass(frozen=True)
class ShardPlan:
    """How a fleet's training data is made and split."""

    dataset: str
    agents: int
    seq_len: int
    seed: int
    samples: int = 0
    """Rows of the train split to use (0 = all; synthetic: how many sequences)."""
    partition: Partition = "iid"
    alpha: float = 0.5


def fleet_shards(plan: ShardPlan, *, model: str) -> list[TokenDataset]:
    """One dataset per agent, disjoint, deterministic given ``plan``.

    Raises:
        AssetMissing: The dataset or model is not installed (names the command).
        ConfigError: Unknown dataset, or too few rows for the fleet.
    """
    if not is_text_spec(plan.dataset):
        return synthetic_shards(
            plan.agents, total=plan.samples or 1600, seq_len=plan.seq_len, seed=plan.seed + 1
        )
    spec = f"{plan.dataset}:split=train" + (f",n={plan.samples}" if plan.samples else "")
    examples = load_examples(spec)
    whole = encode(
        examples, tokenizer=load_tokenizer(model), kind=model_kind(model), seq_len=plan.seq_len
    )
    shards = partition(
        examples.labels, plan.agents, scheme=plan.partition, alpha=plan.alpha, seed=plan.seed
    )
    return [whole.subset(torch.tensor(rows, dtype=torch.int64)) for rows in shards]


def shard_spec(plan: ShardPlan, index: int) -> str:
    """The data spec a real agent would use for shard ``index`` of ``plan``."""
    if not is_text_spec(plan.dataset):
        return "synthetic"
    options = f"split=train,parts={plan.agents},part={index},partition={plan.partition}"
    options += f",alpha={plan.alpha},seed={plan.seed}" + (
        f",n={plan.samples}" if plan.samples else ""
    )
    return f"{plan.dataset}:{options}"


class Scorer:
    """Scores global adapters on held-out data with a freshly built model, and exports them.

    A fresh model (not the aggregator's) makes the number the one a user gets from the
    exported folder.
    """

    def __init__(
        self,
        *,
        model: ModelRef,
        lora: LoraSpec,
        seed: int,
        dataset: str,
        eval_data: str,
        seq_len: int,
    ) -> None:
        """Build the model and read the held-out data once."""
        base = build_model(model, seed=seed, num_labels=num_labels(dataset))
        self.model = attach_lora(base, lora)
        self.data = load_data(eval_data, seq_len=seq_len, model=model)

    def score(self, adapter: TensorMap) -> EvalResult:
        """Loss and accuracy of ``adapter`` on the held-out data."""
        set_adapter(self.model, adapter)
        return evaluate(self.model, self.data)

    def export(self, adapter: TensorMap, path: Path) -> Path:
        """Write ``adapter`` as a peft folder (see ``edgefed.ml.models.export_adapter``)."""
        return export_adapter(self.model, adapter, path)
