"""Aggregator merges per second for SmolLM2-sized LoRA updates on one core.

The adapter layout is derived from the model's ``config.json`` (LoRA r=8 on q_proj and
v_proj of every layer, about 1.8 MB of float32) without loading its weights. One merge is
what the service does per accepted update: validation (shapes, dtypes, finiteness,
norm, the defensive copy) and the strategy's submit.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from aggregator.staleness import InverseSqrt, Polynomial
from aggregator.strategies import Strategy
from aggregator.strategies.fedasync import FedAsync
from aggregator.strategies.fedbuff import FedBuff
from aggregator.validation import ValidationPolicy, validate_update
from edgefed.ml.models import model_folder
from schemas.messages import TensorMap, Update

RANK = 8
TARGETS = ("q_proj", "v_proj")


@dataclass(frozen=True)
class MergeResult:
    """Merges per second of one strategy (median over rounds)."""

    strategy: str
    update_bytes: int
    tensors: int
    merges_per_s: float
    rounds: tuple[float, ...]

    def to_json(self) -> dict[str, object]:
        """The documented JSON row."""
        return {
            "strategy": self.strategy,
            "update_bytes": self.update_bytes,
            "tensors": self.tensors,
            "merges_per_s": round(self.merges_per_s, 1),
            "rounds": [round(r, 1) for r in self.rounds],
        }


def lora_shapes(model: str = "smollm2-135m", *, rank: int = RANK) -> dict[str, tuple[int, ...]]:
    """LoRA A/B shapes on q and v of every layer, from the model folder's ``config.json``."""
    config = json.loads((model_folder(model) / "config.json").read_text())
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    outputs = {
        "q_proj": heads * head_dim,
        "v_proj": int(config.get("num_key_value_heads", heads)) * head_dim,
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(int(config["num_hidden_layers"])):
        for target in TARGETS:
            prefix = f"model.layers.{layer}.self_attn.{target}"
            shapes[f"{prefix}.lora_A.weight"] = (rank, hidden)
            shapes[f"{prefix}.lora_B.weight"] = (outputs[target], rank)
    return shapes


def _updates(shapes: dict[str, tuple[int, ...]], count: int) -> list[Update]:
    generator = torch.Generator().manual_seed(0)
    return [
        Update(
            client_id=f"dev{i}",
            task_id="bench",
            base_version=0,
            num_samples=32,
            delta={name: torch.randn(s, generator=generator) * 1e-3 for name, s in shapes.items()},
        )
        for i in range(count)
    ]


def _round(strategy: Strategy, updates: list[Update], shapes: dict[str, tuple[int, ...]]) -> float:
    """Merges per second of one pass over ``updates``."""
    policy = ValidationPolicy(max_staleness=10, max_update_norm=10.0)
    current: TensorMap = {name: torch.zeros(s) for name, s in shapes.items()}
    base = current
    started = time.perf_counter()
    for update in updates:
        checked = validate_update(
            update,
            task_id="bench",
            method="lora",
            current_version=0,
            shapes=shapes,
            policy=policy,
        )
        result = strategy.submit(
            current=current,
            base=base,
            delta=checked.delta,
            staleness=checked.staleness,
            num_samples=update.num_samples,
            update_id=update.update_id,
        )
        if result.new_global is not None:
            current = result.new_global
    return len(updates) / (time.perf_counter() - started)


def bench_merges(
    *, model: str = "smollm2-135m", updates: int = 100, rounds: int = 5, buffer_size: int = 10
) -> list[MergeResult]:
    """FedBuff (K=``buffer_size``) and FedAsync merges per second, on one torch thread."""
    shapes = lora_shapes(model)
    batch = _updates(shapes, updates)
    size = sum(t.numel() * t.element_size() for t in batch[0].delta.values())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out: list[MergeResult] = []
    try:
        strategies: dict[str, Strategy] = {
            f"fedbuff K={buffer_size}": FedBuff(buffer_size=buffer_size, rule=InverseSqrt()),
            "fedasync": FedAsync(alpha=0.6, rule=Polynomial()),
        }
        timings: dict[str, list[float]] = {name: [] for name in strategies}
        _round(next(iter(strategies.values())), batch[:buffer_size], shapes)  # warm up
        for _ in tqdm(range(rounds), desc="merge rounds", unit="round"):
            for name, strategy in strategies.items():  # interleaved, so drift hits both
                timings[name].append(_round(strategy, batch, shapes))
        for name, values in timings.items():
            out.append(
                MergeResult(
                    strategy=name,
                    update_bytes=size,
                    tensors=len(shapes),
                    merges_per_s=statistics.median(values),
                    rounds=tuple(values),
                )
            )
    finally:
        torch.set_num_threads(threads)
    return out
