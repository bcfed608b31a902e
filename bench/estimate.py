"""``edgefed bench estimate``: the memory estimator against measured peaks.

Each case runs one step of a method in a fresh process (``bench.fwdgrad``'s memory
child, which resets the high-water mark after loading the model) and compares its peak RSS
with two estimates:

- ``estimate``: uncalibrated, what ``edgefed plan`` says (constant runtime term);
- ``calibrated``: that estimate times measured/estimated of the *other* shape of the same
  method, as a device corrects itself after its first step.

``step`` compares only what the step adds: measured peak minus the RSS after loading, against
the estimate less runtime and weights (loaded weights may be mapped pages not yet resident,
so this column is a rough check only).

See docs/architecture.md §7.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bench.fwdgrad import run_child
from edge_agent.memory_estimate import RUNTIME_MB, StepShape, estimate, model_shape

KEYS = {"lora-backprop": "lora", "fwdgrad-fd": "fwdgrad"}
"""Memory-child method -> estimator key."""
CASES: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "tiny": ((16, 128), (64, 256)),
    "smollm2-135m": ((8, 128), (4, 64)),
}
"""Model -> two (batch, seq) shapes; each calibrates the other."""


def compare(
    model: str, shapes: tuple[tuple[int, int], ...], *, threads: int
) -> list[dict[str, Any]]:
    """Measured and estimated peaks (MiB) of lora and fwdgrad at ``shapes`` of ``model``."""
    sizes = model_shape(model)
    rows: list[dict[str, Any]] = []
    for child, key in KEYS.items():
        found = []
        for batch, seq in shapes:
            row = run_child(child, model=model, batch=batch, seq=seq, steps=1, k=1, threads=threads)
            step = StepShape(batch=batch, seq_len=seq)
            found.append((batch, seq, row, estimate(sizes, step, key)))
        for index, (batch, seq, row, est) in enumerate(found):
            other = found[1 - index] if len(found) == 2 else found[index]
            ratio = other[2]["peak_rss_mb"] / other[3].total_mb  # the other shape's calibration
            measured = row["peak_rss_mb"]
            rows.append(
                {
                    "model": model,
                    "method": key,
                    "batch": batch,
                    "seq": seq,
                    "measured_mb": round(measured, 1),
                    "estimate_mb": round(est.total_mb, 1),
                    "error": round(est.total_mb / measured - 1, 3),
                    "calibrated_mb": round(est.total_mb * ratio, 1),
                    "calibrated_error": round(est.total_mb * ratio / measured - 1, 3),
                    "step_measured_mb": round(measured - row["loaded_rss_mb"], 1),
                    "step_estimate_mb": round(est.step_mb, 1),
                }
            )
    return rows


def run(args: argparse.Namespace) -> int:
    """Entry point of ``edgefed bench estimate``; ``--model`` picks one model or ``all``."""
    models = list(CASES) if args.model == "all" else [args.model]
    rows: list[dict[str, Any]] = []
    for model in models:
        shapes = CASES.get(model, ((args.batch, args.seq),))
        rows += compare(model, shapes, threads=torch.get_num_threads())
    if args.json:
        sys.stdout.write(
            json.dumps({"bench": "estimate", "runtime_mb": RUNTIME_MB, "results": rows})
        )
        sys.stdout.write("\n")
    else:
        table = Table(title="estimated vs measured peak RSS (MiB), one step")
        for column in rows[0]:
            table.add_column(column, justify="left" if column in ("model", "method") else "right")
        for row in rows:
            table.add_row(*(str(v) for v in row.values()))
        Console().print(table)
    return 0
