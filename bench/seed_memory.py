"""One device fit in a process of its own, for the seed table's measured peak memory.

``python -m bench.seed_memory --task TASK.json --method M --data SPEC`` builds what an
agent builds for the task (its model, adapter and ``M``'s trainer with ``--trainer`` options,
its data shard, a KD device's proxy rows), resets the process's high-water mark, runs one
fit with the task's ``TrainSpec`` and prints one JSON line: the peak resident memory during
the fit (weights included), what was resident before it, and the fit's seconds. Simulated
agents share one process, so their own readings include each other; this one does not.

A split device's requests are answered here with a zero gradient of the activations' shape,
after a round trip through the wire encoding: neither memory nor bytes depend on the values,
and the server's part, which runs elsewhere, is not charged to the device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from edge_agent.budget import current_rss_mb, peak_rss_mb, reset_peak
from edge_agent.task_model import task_model
from edge_agent.trainers import KdTrainer, SplitTrainer, make_trainer
from edgefed.data.loading import load_data
from edgefed.ml.models import get_adapter
from schemas import codec
from schemas.codec import Compression
from schemas.errors import ConfigError
from schemas.messages import Method, SplitReply, SplitRequest, Task


class _ZeroGradientServer:
    """A split channel whose replies are zero gradients, sized as the server's would be."""

    client_id = "seed-memory"
    task_id = "seed-memory"

    def exchange(
        self, request: SplitRequest, *, compression: Compression
    ) -> tuple[SplitReply, int, int]:
        """Answer a vanilla forward request as the split server would, in shape and dtype.

        Raises:
            ConfigError: A U-shaped request (the server's output would have to be computed).
        """
        if request.variant != "vanilla":
            raise ConfigError("the seed table measures vanilla split devices only")
        sent = codec.encode(request, compression=compression)
        hidden = request.tensors["hidden"]
        reply = SplitReply(
            request_id=request.request_id,
            client_id=request.client_id,
            accepted=True,
            loss=0.0,
            tensors={"grad": torch.zeros_like(hidden)},
        )
        received = codec.encode(reply, compression=compression)
        decoded = codec.decode(received)
        assert isinstance(decoded, SplitReply)
        return decoded, len(sent), len(received)


def measure(
    task: Task, method: Method, data_spec: str, options: dict[str, object]
) -> dict[str, float]:
    """Build the device for ``task`` and run one fit; its peak and resident memory (MiB)."""
    model = task_model(task)
    adapter = get_adapter(model)  # the whole adapter: a split device then drops its rest
    trainer = make_trainer(method, model, **options)
    data = load_data(data_spec, seq_len=task.train.seq_len, model=task.model)
    if isinstance(trainer, KdTrainer):
        if task.proxy is None:
            raise ConfigError("a kd task must announce its proxy slice")
        trainer.use_proxy(task.proxy, seq_len=task.train.seq_len, model=task.model)
    if isinstance(trainer, SplitTrainer):
        trainer.connect(_ZeroGradientServer())
    reset_peak()
    resident = current_rss_mb()
    started = time.perf_counter()
    trainer.fit(adapter, data, task.train, seed=0)
    return {
        "peak_mb": round(peak_rss_mb(), 1),
        "resident_before_mb": round(resident, 1),
        "fit_s": round(time.perf_counter() - started, 2),
    }


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, measure, print one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m bench.seed_memory")
    parser.add_argument("--task", required=True, help="the Task message as JSON (a file)")
    parser.add_argument("--method", required=True)
    parser.add_argument("--data", required=True, help="the device's data spec")
    parser.add_argument("--trainer", default="{}", help="trainer options as a JSON object")
    args = parser.parse_args(argv)
    task = Task.model_validate_json(Path(args.task).read_text())
    row = measure(task, args.method, args.data, json.loads(args.trainer))
    sys.stdout.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
