"""``edgefed bench split``: what split learning costs a device, against whole-model LoRA.

- Device peak memory: one fresh process per row, so each high-water mark is its own.
  ``lora-backprop`` loads the whole model and runs ``LoraTrainer`` steps; ``split`` rows load
  only the embeddings and the first ``cut`` blocks (what a split device holds) and run the
  device's step: forward through its part, the activations encoded as the wire request,
  the reply's gradient decoded and backpropagated, an AdamW step on the device's LoRA. The
  reply is a gradient of the right shape and dtype from this process, since neither memory
  nor bytes depend on its values. ``u_shaped`` rows also hold the head and compute the loss.
- Bytes per step: the encoded request and reply sizes (fp16 and int8 activations).
- Server batching: the same requests served one by one and as one batch, interleaved.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from aggregator.split_training import SplitServer, SplitServerConfig
from edge_agent.budget import current_rss_mb, peak_rss_mb, reset_peak
from edge_agent.trainers import LoraTrainer
from edgefed.ml.models import (
    adapter_parameters,
    attach_lora,
    build_model,
    get_adapter,
    model_folder,
)
from edgefed.ml.split_model import embed, head_loss, model_config, run_blocks
from edgefed.ml.tokens import TokenBatch, TokenDataset
from schemas import codec
from schemas.codec import Compression
from schemas.errors import ConfigError
from schemas.messages import LoraSpec, SplitReply, SplitRequest, TrainSpec

LORA = LoraSpec(rank=8, target_modules=("q_proj", "v_proj"))
"""The adapter of every figure, as in ``edgefed bench memory``: rank 8 on q and v."""
CUTS = (2, 6, 15)


def _partial(name: str, cut: int) -> PreTrainedModel:
    """Embeddings, norm, head and the first ``cut`` blocks only; the rest is never loaded."""
    folder = model_folder(name)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    config.num_hidden_layers = cut
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        folder, config=config, local_files_only=True
    )
    return model


def _batch(vocab: int, batch: int, seq: int) -> TokenBatch:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    return TokenBatch(input_ids=ids, labels=ids)


def child(row: str, *, model: str, cut: int, batch: int, seq: int, steps: int) -> dict[str, Any]:
    """Run ``steps`` device steps of ``row`` in this process; report its peak RSS (MiB)."""
    if row == "lora-backprop":
        peft = attach_lora(build_model(model), LORA)
        vocab = int(model_config(peft).vocab_size)
        one = _batch(vocab, batch, seq)
        data = TokenDataset(input_ids=one.input_ids)
        trainer = LoraTrainer(peft)
        spec = TrainSpec(local_steps=steps, batch_size=batch, seq_len=seq, lr=1e-4)
        adapter = get_adapter(peft)
        reset_peak()
        started = time.perf_counter()
        trainer.fit(adapter, data, spec, seed=0)
    else:
        peft = attach_lora(_partial(model, cut), LORA)
        vocab = int(model_config(peft).vocab_size)
        one = _batch(vocab, batch, seq)
        params = list(adapter_parameters(peft).values())
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        u_shaped = row == "split-u"
        reset_peak()
        started = time.perf_counter()
        for _ in range(steps):
            hidden = run_blocks(peft, embed(peft, one.input_ids), None, 0, cut)
            tensors = {"hidden": hidden.detach()}
            if not u_shaped:
                tensors["labels"] = one.labels
            request = SplitRequest(
                step_id="s",
                client_id="dev",
                task_id="t",
                cut=cut,
                variant="u_shaped" if u_shaped else "vanilla",
                tensors=tensors,
            )
            codec.decode(codec.encode(request, compression="fp16"))
            if u_shaped:  # the server's output comes back; the device scores it
                top = hidden.detach().clone().requires_grad_(True)
                head_loss(peft, top, one.labels).backward()  # type: ignore[no-untyped-call]
            grad = torch.randn_like(hidden) * 1e-3
            reply = SplitReply(
                request_id="r", client_id="dev", accepted=True, tensors={"grad": grad}
            )
            received = codec.decode(codec.encode(reply, compression="fp16"))
            assert isinstance(received, SplitReply)
            hidden.backward(received.tensors["grad"].float())  # type: ignore[no-untyped-call]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - started
    weights = sum(p.numel() * p.element_size() for p in peft.get_base_model().parameters())
    return {
        "row": row,
        "cut": cut if row != "lora-backprop" else None,
        "weights_mb": round(weights / 2**20, 1),
        "rss_now_mb": round(current_rss_mb(), 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "step_s": round(elapsed / steps, 3),
    }


def _run_child(row: str, cut: int, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "bench.split", "--child", row, "--cut", str(cut),
        "--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq),
        "--steps", str(args.steps),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ConfigError(f"{row} cut {cut} failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def step_bytes(*, hidden: int, batch: int, seq: int) -> list[dict[str, Any]]:
    """Encoded bytes of one step's requests and replies, per variant and compression."""
    gen = torch.Generator().manual_seed(0)
    act = torch.randn(batch, seq, hidden, generator=gen)
    labels = torch.randint(0, 1000, (batch, seq), generator=gen)
    rows = []
    compressions: tuple[Compression, ...] = ("fp16", "int8")
    for comp in compressions:
        compression = str(comp)
        fwd = SplitRequest(step_id="s", client_id="pi-0042", task_id="task-1", cut=6,
                           tensors={"hidden": act, "labels": labels})  # fmt: skip
        reply = SplitReply(request_id=fwd.request_id, client_id="pi-0042", accepted=True,
                           loss=2.5, tensors={"grad": act})  # fmt: skip
        up, down = (
            len(codec.encode(fwd, compression=comp)),
            len(codec.encode(reply, compression=comp)),
        )
        u_fwd = fwd.model_copy(update={"variant": "u_shaped", "tensors": {"hidden": act}})
        rows.append({"variant": "vanilla", "compression": compression, "up": up, "down": down})
        u_up = len(codec.encode(u_fwd, compression=comp)) + len(
            codec.encode(
                u_fwd.model_copy(update={"phase": "backward", "tensors": {"grad": act}}),
                compression=comp,
            )
        )
        rows.append(
            {"variant": "u_shaped", "compression": compression, "up": u_up, "down": 2 * down}
        )
    return rows


def bench_batching(
    *, model: str, cut: int, devices: int, batch: int, seq: int, repeat: int
) -> dict[str, Any]:
    """Seconds to serve ``devices`` requests one by one vs as one batch (medians, interleaved)."""
    peft = attach_lora(build_model(model), LORA)
    hidden = int(model_config(peft).hidden_size)
    vocab = int(model_config(peft).vocab_size)
    servers = {
        mode: SplitServer(peft, task_id="t", config=SplitServerConfig(batch=mode == "batched"))
        for mode in ("one by one", "batched")
    }
    gen = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {mode: [] for mode in servers}
    for _ in track(range(repeat + 1), description="server batching"):
        for mode, server in servers.items():
            requests = [
                SplitRequest(step_id="s", client_id=f"d{i}", task_id="t", cut=cut, tensors={
                    "hidden": torch.randn(batch, seq, hidden, generator=gen),
                    "labels": torch.randint(0, vocab, (batch, seq), generator=gen)})
                for i in range(devices)
            ]  # fmt: skip
            started = time.perf_counter()
            server.serve(requests)
            times[mode].append(time.perf_counter() - started)
    one, batched = (statistics.median(times[m][1:]) for m in servers)  # first: warm-up
    return {"devices": devices, "rows_each": batch, "seq": seq, "cut": cut,
            "one_by_one_s": round(one, 3), "batched_s": round(batched, 3),
            "speedup": round(one / batched, 2)}  # fmt: skip


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib  # noqa: PLC0415  # only when a figure is asked for

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    labels = [r["row"] if r["cut"] is None else f"{r['row']}\ncut {r['cut']}" for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(labels, [r["peak_rss_mb"] for r in rows], color="#4477aa")
    ax.set_ylabel("device peak RSS (MiB)")
    ax.set_title("Split learning: device memory vs cut (SmolLM2-135M, 30 blocks)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``edgefed bench split``."""
    plan = [("lora-backprop", 0)] + [("split", c) for c in CUTS] + [("split-u", CUTS[0])]
    rows = [_run_child(row, cut, args) for row, cut in track(plan, description="device memory")]
    base = rows[0]["peak_rss_mb"]
    for row in rows:
        row["ratio_to_lora"] = round(row["peak_rss_mb"] / base, 3)
    hidden = int(AutoConfig.from_pretrained(model_folder(args.model)).hidden_size)
    traffic = step_bytes(hidden=hidden, batch=args.batch, seq=args.seq)
    batching = bench_batching(model=args.model, cut=CUTS[-1], devices=4, batch=2, seq=64,
                              repeat=max(3, args.repeat))  # fmt: skip
    out = {"model": args.model, "batch": args.batch, "seq": args.seq, "memory": rows,
           "bytes": traffic, "batching": batching}  # fmt: skip
    if args.plot:
        _plot(rows, Path(args.plot))
    if args.json:
        sys.stdout.write(json.dumps(out) + "\n")
        return 0
    table = Table(title=f"device peak memory, {args.model}, batch {args.batch} x {args.seq}")
    for column in ("row", "cut", "weights MiB", "peak RSS MiB", "ratio to lora", "s/step"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["row"], str(r["cut"] or "-"), f"{r['weights_mb']:,.0f}",
                      f"{r['peak_rss_mb']:,.0f}", f"{r['ratio_to_lora']:.2f}", f"{r['step_s']}")  # fmt: skip
    console = Console()
    console.print(table)
    console.print({"bytes per step": traffic, "server batching": batching})
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.split --child ...``: one measured row in a fresh process."""
    parser = argparse.ArgumentParser(prog="bench.split")
    parser.add_argument("--child", required=True, choices=["lora-backprop", "split", "split-u"])
    parser.add_argument("--cut", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    row = child(args.child, model=args.model, cut=args.cut, batch=args.batch, seq=args.seq,
                steps=args.steps)  # fmt: skip
    sys.stdout.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
