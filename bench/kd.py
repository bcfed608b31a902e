"""KD against LoRA on the same fleet: held-out accuracy before and after, bytes per update.

A short run, not a CI test (docs/architecture.md §11: bytes per update per method)::

    edgefed bench kd --model smollm2-135m --dataset rotten-tomatoes --versions 3 --agents 2

Both runs share the model, data split, agents, local steps and number of versions; only
the method differs. KD devices answer with top-k logits on a fresh proxy slice per version
(for prompted text only the answer token is scored, so a slice costs rows x k x 6 bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from typing import Any

from edgefed.data.sources import is_text_spec
from edgefed.transport.broker_choice import broker_for
from edgefed.transport.config import BrokerAddress
from schemas.messages import Method
from simulator.fleet import FleetConfig, run_fleet


def _summary(results: dict[str, Any]) -> dict[str, float | int | None]:
    history = [h for h in results["history"] if h["eval_loss"] is not None]
    sizes = [u["bytes"] for u in results["updates"]]
    return {
        "versions": results["history"][-1]["version"],
        "loss_before": history[0]["eval_loss"],
        "loss_after": history[-1]["eval_loss"],
        "accuracy_before": history[0]["eval_accuracy"],
        "accuracy_after": history[-1]["eval_accuracy"],
        "updates": len(sizes),
        "bytes_per_update": statistics.median(sizes) if sizes else None,
    }


async def compare(
    *, model: str, dataset: str, versions: int, agents: int, url: BrokerAddress
) -> dict[str, dict[str, float | int | None]]:
    """Run a LoRA fleet and a KD fleet of the same shape; one summary per method."""
    text = is_text_spec(dataset)
    train: dict[str, int | float] = (
        {"local_steps": 2, "batch_size": 4, "seq_len": 48, "lr": 2e-3} if text else {}
    )
    kd: dict[str, object] = (
        {"proxy_dataset": f"{dataset}:split=train", "proxy_size": 32, "server_lr": 2e-3}
        if text
        else {}
    )
    out: dict[str, dict[str, float | int | None]] = {}
    methods: tuple[Method, ...] = ("lora", "kd")
    for method in methods:
        config = FleetConfig(
            model=model,
            agents=agents,
            method=method,
            dataset=dataset,
            train_samples=64 if text else 1600,
            eval_samples=200,
            slowdowns=(1.0,),
            max_versions=versions,
            ack_timeout_s=600.0,
            aggregator={"train": train, "strategy": {"buffer_size": agents}, "kd": kd},
        )
        result = await run_fleet(config, url=url, progress=False)
        out[method] = _summary(result.to_dict())
    return out


def run(args: argparse.Namespace) -> int:
    """``edgefed bench kd``: one JSON object; per method, accuracy/loss before and after, bytes."""
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    async with broker_for(args.broker) as url:
        report = await compare(
            model=args.model,
            dataset=args.dataset,
            versions=args.versions,
            agents=args.agents or 2,
            url=url,
        )
    print(json.dumps(report, indent=1))
    return 0
