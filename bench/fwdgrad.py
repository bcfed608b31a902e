"""``edgefed bench memory|bytes|fwdgrad``: what forward gradients cost and save.

- ``memory``: peak RSS of one process per method (inference, lora-backprop, full-backprop,
  fwdgrad-fd, fwdgrad-jvp) on the same model, batch and sequence length, each also as a
  ratio to inference (the same forward pass and loss under ``no_grad``). Separate processes
  give every method a fresh high-water mark.
- ``bytes``: the encoded size of one update per method and compression for the model's
  adapter layout: lora dense (fp32, fp16, int8), fwdgrad seeds (K = 16 and 64), fwdgrad dense.
- ``fwdgrad``: the learning side on the tiny model: eval loss after the same number of
  local steps for fd and jvp, both perturbation targets, and discriminative sampling.

See docs/architecture.md §11.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from peft import PeftModel
from rich.console import Console
from rich.table import Table
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from edge_agent.budget import current_rss_mb as _current_rss_mb
from edge_agent.budget import peak_rss_mb as _peak_rss_mb
from edge_agent.budget import reset_peak
from edge_agent.trainers import FwdGradConfig, FwdGradTrainer, LoraTrainer
from edge_agent.trainers.fwdgrad import GradMode
from edgefed.data.synthetic import synthetic_dataset
from edgefed.ml.evaluation import evaluate
from edgefed.ml.models import attach_lora, build_model, get_adapter, set_adapter
from edgefed.ml.objectives import batch_loss
from edgefed.ml.perturbation import Layout
from edgefed.ml.tokens import TokenBatch, TokenDataset
from schemas.codec import Compression, encode
from schemas.errors import ConfigError
from schemas.messages import (
    LoraSpec,
    Method,
    ModelRef,
    SeedDelta,
    SeedStep,
    TensorMap,
    TrainSpec,
    Update,
)

BENCHES = ("memory", "bytes", "fwdgrad")
MEMORY_METHODS = ("inference", "lora-backprop", "full-backprop", "fwdgrad-fd", "fwdgrad-jvp")
LORA = LoraSpec(rank=8, target_modules=("q_proj", "v_proj"))
"""The adapter every figure uses: rank 8 on q and v (461k values on SmolLM2-135M)."""


def _smollm2_shaped() -> PreTrainedModel:
    """SmolLM2-135M's architecture with random weights, when the real one is not prepared."""
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        use_cache=False,
        attn_implementation="sdpa",  # type: ignore[call-arg]  # a PretrainedConfig kwarg LlamaConfig's typed signature omits
    )
    return LlamaForCausalLM(config)


def load_base(name: str) -> tuple[PreTrainedModel, str]:
    """The base model and where its weights came from (``loaded`` or ``random``)."""
    try:
        return build_model(ModelRef(name=name)), "loaded"
    except ConfigError:
        if name != "smollm2-135m":
            raise
        return _smollm2_shaped(), "random"


def _random_data(vocab: int, batch: int, seq: int) -> TokenDataset:
    gen = torch.Generator().manual_seed(0)
    return TokenDataset(input_ids=torch.randint(0, vocab, (batch, seq), generator=gen))


Workload = Callable[[], object]
"""The measured part of a memory run: everything it allocates counts toward the peak."""


def memory_child(
    method: str, *, model: str, batch: int, seq: int, steps: int, k: int
) -> dict[str, Any]:
    """Run ``steps`` steps of ``method`` in this process; report its peak RSS (MiB)."""
    base, weights = load_base(model)  # Llama has no dropout: train and eval mode agree
    vocab = int(base.config.vocab_size)
    data = _random_data(vocab, batch, seq)
    spec = TrainSpec(local_steps=steps, batch_size=batch, seq_len=seq, lr=1e-4, perturbations=k)
    trainable, run = _workload(method, base, data, spec)
    reset_peak()  # the step's peak, not the model load's
    loaded = _current_rss_mb()
    started = time.perf_counter()
    run()
    elapsed = time.perf_counter() - started
    return {
        "method": method,
        "weights": weights,
        "trainable": trainable,
        "loaded_rss_mb": round(loaded, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "step_s": round(elapsed / steps, 3),
    }


def _workload(
    method: str, base: PreTrainedModel, data: TokenDataset, spec: TrainSpec
) -> tuple[int, Workload]:
    """How many values ``method`` trains, and its steps, set up but not yet run.

    Raises:
        ConfigError: ``method`` is not one of :data:`MEMORY_METHODS`.
    """
    one = TokenBatch(input_ids=data.input_ids, labels=data.input_ids)
    if method == "full-backprop":
        return _full_backprop(base, one, spec.local_steps)
    peft = attach_lora(base, LORA)
    peft.eval()
    adapter = get_adapter(peft)
    trainable = sum(t.numel() for t in adapter.values())
    return trainable, _adapter_workload(
        method, peft, adapter=adapter, data=data, one=one, spec=spec
    )


def _full_backprop(base: PreTrainedModel, one: TokenBatch, steps: int) -> tuple[int, Workload]:
    """Every weight trainable under AdamW: the ceiling the other methods are compared to."""
    for p in base.parameters():
        p.requires_grad_(True)
    trainable = sum(p.numel() for p in base.parameters())
    optimizer = torch.optim.AdamW(base.parameters(), lr=1e-5)

    def run() -> object:
        for _ in range(steps):
            loss = batch_loss(base, one)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return None

    return trainable, run


def _adapter_workload(
    method: str,
    peft: PeftModel,
    *,
    adapter: TensorMap,
    data: TokenDataset,
    one: TokenBatch,
    spec: TrainSpec,
) -> Workload:
    """Inference, LoRA backprop or a forward-gradient fit of the adapter on ``data``.

    Raises:
        ConfigError: ``method`` is not one of :data:`MEMORY_METHODS`.
    """
    if method == "inference":

        def infer() -> object:
            with torch.no_grad():
                return [float(batch_loss(peft, one)) for _ in range(spec.local_steps)]

        return infer
    if method == "lora-backprop":
        trainer = LoraTrainer(peft)
        return lambda: trainer.fit(adapter, data, spec, seed=0)
    if method in ("fwdgrad-fd", "fwdgrad-jvp"):
        mode: GradMode = "fd" if method == "fwdgrad-fd" else "jvp"
        fwd = FwdGradTrainer(peft, FwdGradConfig(mode=mode))
        return lambda: fwd.fit(adapter, data, spec, seed=0)
    raise ConfigError(f"unknown method {method!r}; one of {MEMORY_METHODS}")


def run_child(
    method: str, *, model: str, batch: int, seq: int, steps: int, k: int, threads: int
) -> dict[str, Any]:
    """:func:`memory_child` in a fresh process, so its high-water mark is its own.

    Raises:
        ConfigError: The child failed.
    """
    command = [
        sys.executable, "-m", "bench.fwdgrad", "--child", method, "--model", model,
        "--batch", str(batch), "--seq", str(seq), "--steps", str(steps), "--k", str(k),
        "--threads", str(threads),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ConfigError(f"{method} failed:\n{done.stderr[-2000:]}")
    row: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return row


def bench_memory(
    *, model: str, batch: int, seq: int, steps: int, k: int, threads: int
) -> list[dict[str, Any]]:
    """Each method in its own fresh process; rows carry ``ratio_to_inference``."""
    rows = [
        run_child(method, model=model, batch=batch, seq=seq, steps=steps, k=k, threads=threads)
        for method in MEMORY_METHODS
    ]
    inference = rows[0]["peak_rss_mb"]
    loaded = rows[0]["loaded_rss_mb"]
    for row in rows:
        row["ratio_to_inference"] = round(row["peak_rss_mb"] / inference, 3)
        row["working_mb"] = round(row["peak_rss_mb"] - loaded, 1)
    return rows


def _update_bytes(
    *,
    method: Method,
    delta: TensorMap | None = None,
    seeds: SeedDelta | None = None,
    compression: Compression = "none",
) -> int:
    update = Update(
        client_id="pi-0042",
        task_id="task-1",
        base_version=1234,
        num_samples=800,
        method=method,
        delta=delta or {},
        seeds=seeds,
        variance=None if seeds is None else 0.123456789,
        train_loss=2.345678,
        compute_s=12.3456,
    )
    return len(encode(update, compression=compression))


def _seeds(layout: Layout, k: int, steps: int, candidates: int) -> SeedDelta:
    rng = random.Random(k * 1000 + steps)
    return SeedDelta(
        lr=3.4e-4,
        target=layout.target,
        layout=layout.fingerprint,
        steps=tuple(
            SeedStep(
                seed=rng.getrandbits(64),
                indices=tuple(sorted(rng.sample(range(candidates * k), k))),
                d=tuple(rng.gauss(0, 0.5) for _ in range(k)),
                scale=1.0 if s % 2 else rng.random(),
            )
            for s in range(steps)
        ),
    )


def bench_bytes(*, model: str, steps: int) -> list[dict[str, Any]]:
    """Encoded bytes of one update per method for ``model``'s adapter layout."""
    base, _ = load_base(model)
    peft = attach_lora(base, LORA)
    adapter = get_adapter(peft)
    gen = torch.Generator().manual_seed(0)
    delta = {name: 1e-3 * torch.randn(t.shape, generator=gen) for name, t in adapter.items()}
    layout = Layout.from_shapes({name: tuple(t.shape) for name, t in adapter.items()})
    values = layout.size
    rows: list[dict[str, Any]] = [
        {
            "update": f"lora dense {c}",
            "bytes": _update_bytes(method="lora", delta=delta, compression=c),
        }
        for c in ("none", "fp16", "int8")
    ]
    for k in (16, 64):
        for n_steps in sorted({1, steps}):
            for m in (1, 4):
                seeds = _seeds(layout, k, n_steps, m)
                rows.append(
                    {
                        "update": f"fwdgrad seeds K={k} steps={n_steps}"
                        + (f" (from {m}K candidates)" if m > 1 else ""),
                        "bytes": _update_bytes(method="fwdgrad", seeds=seeds),
                    }
                )
    dense = _update_bytes(method="fwdgrad", delta=delta)
    rows.append({"update": "fwdgrad dense fp32", "bytes": dense})
    for row in rows:
        row["adapter_values"] = values
    return rows


def bench_learning(*, rounds: int, steps: int, k: int) -> list[dict[str, Any]]:
    """Eval loss on the tiny model's synthetic task after ``rounds`` fits of ``steps`` steps."""
    variants: list[tuple[str, FwdGradConfig, LoraSpec]] = [
        ("fd, all", FwdGradConfig(), LoraSpec()),
        ("fd, lora_B", FwdGradConfig(target="lora_B"), LoraSpec()),
        ("fd, ffa (B only)", FwdGradConfig(), LoraSpec(mode="ffa")),
        ("fd, all, 4K candidates", FwdGradConfig(candidates=4), LoraSpec()),
        ("jvp, all", FwdGradConfig(mode="jvp"), LoraSpec()),
        ("jvp, all, batch 16", FwdGradConfig(mode="jvp", jvp_batch=16), LoraSpec()),
    ]
    data = synthetic_dataset(400, seed=1)
    held_out = synthetic_dataset(128, seed=999)
    spec = TrainSpec(local_steps=steps, perturbations=k)
    rows: list[dict[str, Any]] = []
    for name, config, lora in variants:
        model = attach_lora(build_model("tiny"), lora)
        trainer = FwdGradTrainer(model, config)
        adapter = get_adapter(model)
        before = evaluate(model, held_out).loss
        started = time.perf_counter()
        diverged = 0
        for r in range(rounds):
            fit = trainer.fit(adapter, data, spec, seed=r)
            diverged += fit.diverged
            adapter = {n: adapter[n] + fit.delta[n] for n in adapter}
        elapsed = time.perf_counter() - started
        set_adapter(model, adapter)
        rows.append(
            {
                "variant": name,
                "eval_loss_before": round(before, 4),
                "eval_loss_after": round(evaluate(model, held_out).loss, 4),
                "s_per_step": round(elapsed / (rounds * steps), 4),
                "diverged_fits": diverged,
            }
        )
    model = attach_lora(build_model("tiny"), LoraSpec())
    reference = LoraTrainer(model)
    adapter = get_adapter(model)
    started = time.perf_counter()
    for r in range(rounds):
        fit = reference.fit(adapter, data, spec, seed=r)
        adapter = {n: adapter[n] + fit.delta[n] for n in adapter}
    elapsed = time.perf_counter() - started
    set_adapter(model, adapter)
    rows.append(
        {
            "variant": f"reference: lora backprop, AdamW lr {spec.lr:g}",
            "eval_loss_before": rows[0]["eval_loss_before"],
            "eval_loss_after": round(evaluate(model, held_out).loss, 4),
            "s_per_step": round(elapsed / (rounds * steps), 4),
            "diverged_fits": 0,
        }
    )
    return rows


def _table(title: str, rows: list[dict[str, Any]]) -> None:
    table = Table(title=title)
    for column in rows[0]:
        table.add_column(
            column, justify="left" if column in ("method", "update", "variant") else "right"
        )
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``edgefed bench memory|bytes|fwdgrad``; returns the exit code."""
    if args.which == "memory":
        rows = bench_memory(
            model=args.model, batch=args.batch, seq=args.seq, steps=args.steps, k=args.k,
            threads=torch.get_num_threads(),
        )  # fmt: skip
        title = f"peak RSS, {args.model}, batch {args.batch} x {args.seq}"
    elif args.which == "bytes":
        rows = bench_bytes(model=args.model, steps=args.steps)
        title = f"bytes of one update, {args.model} adapter (LoRA r8 q,v)"
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            rows = bench_learning(rounds=args.rounds, steps=args.steps, k=args.k)
        finally:
            torch.set_num_threads(threads)
        title = f"tiny model, {args.rounds} fits x {args.steps} steps, K={args.k}"
    if args.json:
        sys.stdout.write(json.dumps({"bench": args.which, "results": rows}) + "\n")
    else:
        _table(title, rows)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of these benchmarks (shared with ``edgefed bench``)."""
    parser.add_argument(
        "--model", default="smollm2-135m", help="memory/bytes: model name or folder"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="local steps per fit")
    parser.add_argument("--k", type=int, default=16, help="perturbations per step")
    parser.add_argument("--rounds", type=int, default=20, help="fwdgrad: fits per variant")


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.fwdgrad --child METHOD ...``: one memory measurement."""
    parser = argparse.ArgumentParser(prog="bench.fwdgrad")
    parser.add_argument("--child", required=True, choices=MEMORY_METHODS)
    parser.add_argument("--threads", type=int, default=0)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    row = memory_child(
        args.child, model=args.model, batch=args.batch, seq=args.seq, steps=args.steps, k=args.k
    )
    sys.stdout.write(json.dumps(row) + "\n")
    return 0 if math.isfinite(row["peak_rss_mb"]) else 1


if __name__ == "__main__":
    sys.exit(main())
