"""``edgefed bench all|scale|throughput|merge|seed``: the benchmark suite and its RESULTS.md section.

Each benchmark runs side by side with its baseline in one process and is reported as a
ratio, with the command that reproduces it. ``bench all`` writes every figure to
``bench/suite.json`` and rewrites only its own block of ``bench/RESULTS.md`` (between the
``bench-suite`` markers); other sections of that file are left as they are. ``bench seed``
(about 45 minutes) is not part of ``all``: it writes ``bench/seed.json``, its figure and a
section of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.results_file import replace_block

BENCH_DIR = Path(__file__).resolve().parent
START = "<!-- bench-suite:start -->"
END = "<!-- bench-suite:end -->"
FLEET = "simulator/fleets/stragglers.toml"
MERGE_TARGET = 200.0
THROUGHPUT_TARGET = 0.8

console = Console(stderr=True)


def _scale(agents: int, updates: int, spread_s: float) -> dict[str, Any]:
    from bench.scale import ScaleConfig, scale_run  # noqa: PLC0415 (heavy)
    from bench.scale_report import plot_lag, print_scale  # noqa: PLC0415

    result = scale_run(
        ScaleConfig(agents=agents, updates_per_agent=updates, spread_s=spread_s, buffer_size=20)
    )
    print_scale(result, console)
    plot = plot_lag(result, BENCH_DIR / "scale_lag.png")
    return result.to_json() | {"plot": plot.name}


def _throughput(count: int, trials: int) -> dict[str, Any]:
    from bench.throughput_run import throughput_run  # noqa: PLC0415

    return throughput_run(count=count, trials=trials).to_json()


def _merges(rounds: int) -> dict[str, Any]:
    from bench.merge import bench_merges  # noqa: PLC0415

    return {"results": [r.to_json() for r in bench_merges(rounds=rounds)]}


def _seed(budget_s: float | None, *, save: bool, only: str | None = None) -> dict[str, Any]:
    """The seed-paper table (:mod:`bench.seed_table`); ``save``: its RESULTS.md section.

    ``only`` reruns one dataset's rows; the other rows then come from ``bench/seed.json``.
    """
    from bench import seed_report  # noqa: PLC0415 (plots)
    from bench.seed_table import AGENTS, EVAL_ROWS, TASKS, run_table  # noqa: PLC0415
    from edgefed.transport.broker import MosquittoProcess  # noqa: PLC0415

    known = [task.dataset for task in TASKS]
    if only is not None and only not in known:
        raise SystemExit(f"edgefed bench seed: --task must be one of {known}, got {only!r}")
    tasks = tuple(
        task if budget_s is None else dataclasses.replace(task, budget_s=budget_s)
        for task in TASKS
        if only in (None, task.dataset)
    )
    started = time.perf_counter()
    with MosquittoProcess() as broker:
        rows = asyncio.run(run_table(url=broker.url, tasks=tasks))
    today = time.strftime("%Y-%m-%d")
    data: dict[str, Any] = {
        "agents": AGENTS,
        "eval_rows": EVAL_ROWS,
        "budgets": [(t.dataset, t.model, t.budget_s) for t in tasks],
        "measured": {t.dataset: today for t in tasks},
        "wall_s": round(time.perf_counter() - started, 1),
        "results": rows,
    }
    saved = BENCH_DIR / "seed.json"
    if only is not None and saved.exists():
        data = _with_saved_rows(data, json.loads(saved.read_text()), order=known)
    if save:
        saved.write_text(json.dumps(data, indent=1) + "\n")
        figure = seed_report.plot(data["results"], BENCH_DIR / "seed_table.png")
        seed_report.write_section(data, figure.name, BENCH_DIR / "RESULTS.md")
        console.print(f"wrote bench/seed.json, {figure} and its section of bench/RESULTS.md")
    return data


def _with_saved_rows(
    data: dict[str, Any], before: dict[str, Any], *, order: list[str]
) -> dict[str, Any]:
    """``data`` (some datasets' rows) completed with the other datasets' saved rows."""
    rerun = set(data["measured"])
    kept = [row for row in before["results"] if row["dataset"] not in rerun]

    def by_task(items: list[Any], dataset: Callable[[Any], str]) -> list[Any]:
        return sorted(items, key=lambda item: order.index(dataset(item)))

    old_budgets = [b for b in before["budgets"] if b[0] not in rerun]
    old_share = len(kept) / max(1, len(before["results"]))
    return data | {
        "results": by_task(kept + data["results"], lambda row: row["dataset"]),
        "budgets": by_task(old_budgets + data["budgets"], lambda budget: budget[0]),
        "measured": {
            d: before.get("measured", {}).get(d, "earlier") for d in order if d not in rerun
        }
        | data["measured"],
        "wall_s": round(data["wall_s"] + before["wall_s"] * old_share, 1),
    }


def _codec() -> dict[str, Any]:
    return _edgefed_json(["bench", "codec", "--json"])


def _memory() -> dict[str, Any]:
    return _edgefed_json(
        ["bench", "memory", "--model", "smollm2-135m", "--batch", "8", "--seq", "128",
         "--steps", "1", "--k", "8", "--json"]
    )  # fmt: skip


def _bytes() -> dict[str, Any]:
    return _edgefed_json(["bench", "bytes", "--steps", "5", "--json"])


def _time_to_target() -> dict[str, Any]:
    """Async vs sync on the straggler fleet, through ``edgefed simulate --fleet``."""
    if not (BENCH_DIR.parent / FLEET).exists():
        return {"skipped": f"{FLEET} is not in this checkout"}
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edgefed-tta-") as folder:
        for mode in ("async", "sync"):
            out = Path(folder) / f"{mode}.json"
            command = ["simulate", "--fleet", FLEET, "--mode", mode, "--json-out", str(out)]
            done = _edgefed(command)
            if done.returncode != 0:
                return {"skipped": f"edgefed {' '.join(command)} failed: {done.stderr[-400:]}"}
            runs[mode] = json.loads(out.read_text()).get("time_to_target_s")
    fast, slow = runs["async"], runs["sync"]
    ratio = slow / fast if fast and slow else None
    return {"async_s": fast, "sync_s": slow, "sync_over_async": ratio}


def _edgefed(argv: list[str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "edgefed.cli", *argv]
    return subprocess.run(
        command, capture_output=True, text=True, check=False, cwd=BENCH_DIR.parent
    )


def _edgefed_json(argv: list[str]) -> dict[str, Any]:
    done = _edgefed(argv)
    if done.returncode != 0:
        return {"skipped": f"edgefed {' '.join(argv)} failed: {done.stderr.strip()[-400:]}"}
    row: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return row


def run_suite(*, quick: bool, agents: int) -> dict[str, Any]:
    """Every benchmark in turn (``quick``: smaller runs, no model-loading ones)."""
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "codec": _codec,
        "scale": lambda: _scale(agents, 1 if quick else 2, 5.0 if quick else 10.0),
        "throughput": lambda: _throughput(32 if quick else 64, 2 if quick else 3),
        "merges": lambda: _merges(2 if quick else 5),
    }
    if not quick:
        steps |= {
            "memory": _memory,
            "bytes": _bytes,
            "time_to_target": _time_to_target,
        }
    results: dict[str, Any] = {"quick": quick}
    for name, step in steps.items():
        console.rule(f"bench {name}")
        started = time.perf_counter()
        results[name] = step()
        results[name]["wall_s"] = round(time.perf_counter() - started, 1)
        results[name]["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return results


def _cpu_split(tput: dict[str, Any], variant: str) -> str:
    """``total ms (receiver + publishers + broker)`` of one throughput variant."""
    parts = (tput[f"{variant}_{p}_cpu_ms"] for p in ("receiver", "publishers", "broker"))
    return f"{tput[f'{variant}_total_cpu_ms']:.1f} ms ({' + '.join(f'{x:.1f}' for x in parts)})"


def _merge_rows(data: dict[str, Any]) -> list[str]:
    rows = []
    for row in data.get("results", []):
        ratio = row["merges_per_s"] / MERGE_TARGET
        rows.append(
            f"| merges/s, {row['strategy']}, {row['update_bytes'] / 1e6:.2f} MB LoRA r8 q,v "
            f"({row['tensors']} tensors), 1 thread | {row['merges_per_s']:.0f}/s | "
            f"{ratio:.2f}x of the 200/s target | `edgefed bench merge` |"
        )
    return rows


def markdown(results: dict[str, Any]) -> str:
    """The RESULTS.md block for ``results``."""
    scale = results.get("scale", {})
    lines = [
        *_preamble(results),
        *_scale_rows(scale),
        *_throughput_rows(results.get("throughput", {})),
        *_merge_rows(results.get("merges", {})),
        *_codec_rows(results.get("codec", {})),
        *_memory_rows(results.get("memory", {}).get("results", [])),
        *_bytes_rows(results.get("bytes", {}).get("results", [])),
        *_time_to_target_rows(results.get("time_to_target", {})),
        *_skipped_rows(results),
    ]
    if scale:
        lines += ["", f"![publish→merged lag, {scale['agents']} agents]({scale['plot']})"]
    lines += ["", END]
    return "\n".join(lines)


def _preamble(results: dict[str, Any]) -> list[str]:
    """Title, how to reproduce, the host's load, and the table's header."""
    return [
        START,
        "# Benchmark suite (`edgefed bench all`)",
        "",
        "Reproduce everything with `make bench` (or `.venv/bin/edgefed bench all`; `--quick` for",
        "a small subset); raw figures in `bench/suite.json`. Each row's own command is given.",
        "",
        *_load_note(results),
        "| measure | measured | ratio / target | command |",
        "|---|---|---|---|",
    ]


def _load_note(results: dict[str, Any]) -> list[str]:
    """The load average after each step: absolute rates depend on what else ran."""
    loads = {
        k: v["load_avg_1m"]
        for k, v in results.items()
        if isinstance(v, dict) and "load_avg_1m" in v
    }
    if not loads:
        return []
    listed = ", ".join(f"{k} {v:g}" for k, v in loads.items())
    return [
        f"Host load (1-minute load average on 2 cores, after each step): {listed}. Other jobs",
        "shared the cores; the ratios are measured side by side, absolute rates are not.",
        "",
    ]


def _scale_rows(scale: dict[str, Any]) -> list[str]:
    """Connect time and memory, lost updates, and merge lag of the many-agents run."""
    if not scale:
        return []
    lag, ok = scale["merge_lag_ms"], "yes" if scale["ok"] else "NO"
    return [
        f"| {scale['agents']} agents (real MQTT connections): connect all | "
        f"{scale['connect_s']:.2f} s | broker RSS {scale['broker_rss_idle_mb']:.1f} → "
        f"{scale['broker_rss_peak_mb']:.1f} MB peak; agents' process "
        f"{scale.get('agents_rss_mb') or 0:.0f} MB | "
        f"`edgefed bench scale --agents {scale['agents']}` |",
        f"| {scale['agents']} agents: acked updates lost | {scale['lost']} of "
        f"{scale['updates_accepted']} (merged once {scale['merged_once']}, buffered "
        f"{scale['buffered']}, merged twice {scale['merged_twice_or_more']}) | zero lost: "
        f"{ok} | same |",
        f"| {scale['agents']} agents: publish→merged p50/p90/p99 | {lag['p50']:.0f} / "
        f"{lag['p90']:.0f} / {lag['p99']:.0f} ms at {scale['updates_per_s']:.0f} updates/s "
        f"| FedBuff K=20, {scale['update_bytes'] / 1024:.0f} KiB updates | same |",
    ]


def _throughput_rows(tput: dict[str, Any]) -> list[str]:
    """End to end against the raw broker, per variant, and the CPU-bound ratio if known."""
    if not tput:
        return []
    raw, raw_cpu = tput["raw_mbps"], tput["raw_receiver_cpu_ms"]
    rows = [
        f"| 1 MiB updates publish→merged vs raw broker (same run), 256 KiB chunks | "
        f"{tput['e2e_mbps']:.0f} vs {raw:.0f} MB/s; receiver CPU "
        f"{tput['e2e_receiver_cpu_ms']:.1f} vs {raw_cpu:.1f} ms/update | "
        f"{tput['ratio']:.2f}x (target {THROUGHPUT_TARGET}x) | `edgefed bench throughput` |",
        f"| same, devices' encoding before the clock | {tput['e2e_encode_first_mbps']:.0f}"
        f" vs {raw:.0f} MB/s; receiver CPU {tput['e2e_encode_first_receiver_cpu_ms']:.1f}"
        f" ms/update | {tput['ratio_e2e_encode_first']:.2f}x | same |",
        f"| same, `max_payload` 2 MiB (one frame per update) | {tput['e2e_whole_mbps']:.0f}"
        f" vs {raw:.0f} MB/s; receiver CPU {tput['e2e_whole_receiver_cpu_ms']:.1f}"
        f" ms/update | {tput['ratio_e2e_whole']:.2f}x | same |",
    ]
    if tput.get("merger_cpu_ms") is not None:
        rows.append(
            f"| same, whole updates through 2 intake replicas (pre-sums of {tput['replicas_presum_size']}) | "
            f"{tput['e2e_replicas_mbps']:.0f} vs {raw:.0f} MB/s; merger CPU "
            f"{tput['merger_cpu_ms']:.1f} ms/update (bare subscriber {tput['bare_cpu_ms']:.1f}),"
            f" replicas {tput['replicas_cpu_ms']:.1f} | {tput['ratio_e2e_replicas']:.2f}x | same |"
        )
    if tput.get("ratio_cpu_bound") is not None:
        rows.append(
            "| same, CPU per update of every process (receiver + publishers + broker),"
            f" 256 KiB chunks | {_cpu_split(tput, 'e2e')} vs {_cpu_split(tput, 'raw')} | "
            f"{tput['ratio_cpu_bound']:.2f}x: the ratio these totals allow on a host"
            " whose cores all three share | same |"
        )
    return rows


def _codec_rows(codec: dict[str, Any]) -> list[str]:
    """One row per payload size: the codec's round trip against a plain memory copy."""
    return [
        f"| codec round trip vs memcpy, {row['size_bytes'] / 1024:,.0f} KiB | "
        f"{row['roundtrip_gbps']:.2f} vs {row['memcpy_gbps']:.2f} GB/s | "
        f"{row['ratio_vs_memcpy']:.2f}x | `edgefed bench codec` |"
        for row in codec.get("results", [])
    ]


def _memory_rows(memory: list[dict[str, Any]]) -> list[str]:
    """Every method's peak RSS on one row, each as a ratio to inference."""
    if not memory:
        return []
    peaks = ", ".join(
        f"{r['method']} {r['peak_rss_mb']:.0f} MB ({r['ratio_to_inference']:.2f}x)" for r in memory
    )
    return [
        "| device peak RSS per method, SmolLM2-135M, batch 8 x 128, LoRA r8 q,v | "
        f"{peaks} | ratio to inference | `edgefed bench memory --model smollm2-135m "
        "--batch 8 --seq 128 --steps 1 --k 8` |"
    ]


def _bytes_rows(sizes: list[dict[str, Any]]) -> list[str]:
    """Every update kind's encoded size on one row, beside the dense fp32 one."""
    if not sizes:
        return []
    listed = ", ".join(f"{r['update']}: {r['bytes']:,} B" for r in sizes)
    dense = next((r["bytes"] for r in sizes if r["update"] == "lora dense none"), None)
    ratio = f"dense fp32 = {dense:,} B" if dense else ""
    return [
        f"| bytes per update per method (SmolLM2 adapter) | {listed} | {ratio} | "
        "`edgefed bench bytes --steps 5` |"
    ]


def _time_to_target_rows(tta: dict[str, Any]) -> list[str]:
    """Async against sync on the straggler fleet, or why it was not measured."""
    if "skipped" in tta:
        return [f"| time to target, async vs sync | not measured: {tta['skipped']} | | |"]
    if not tta:
        return []
    return [
        f"| time to target loss, stragglers fleet (simulated time) | async "
        f"{_num(tta['async_s'])} s, sync {_num(tta['sync_s'])} s | async "
        f"{_num(tta['sync_over_async'])}x sooner (target 2x) | `edgefed simulate "
        f"--fleet {FLEET} --mode async` and `--mode sync` |"
    ]


def _skipped_rows(results: dict[str, Any]) -> list[str]:
    """A row for every other benchmark that could not run, saying why."""
    return [
        f"| {name} | not measured: {data['skipped']} | | |"
        for name, data in results.items()
        if isinstance(data, dict) and "skipped" in data and name != "time_to_target"
    ]


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def write_results(results: dict[str, Any], path: Path) -> None:
    """Replace (or append) the suite's block in ``path``; the rest stays as it is."""
    replace_block(path, START, END, markdown(results))


def run(args: argparse.Namespace) -> int:
    """``edgefed bench scale|throughput|merge|seed|all``.

    A single benchmark with ``--save`` replaces its own entry of ``bench/suite.json`` and
    regenerates the suite block of RESULTS.md from it (``edgefed bench codec --save`` too;
    ``seed --save`` rewrites its own files and section);
    ``all`` replaces every entry it measured (``--quick`` measures fewer and keeps the
    others).
    """
    which: str = args.which
    if which == "seed":
        data = _seed(args.budget, save=args.save, only=args.task)
        sys.stdout.write(json.dumps(data) + "\n")
        return 0
    singles: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
        "scale": (
            "scale",
            lambda: _scale(args.agents or 1000, args.updates_per_agent, args.spread),
        ),
        "throughput": ("throughput", lambda: _throughput(64, args.repeat or 3)),
        "merge": ("merges", lambda: _merges(args.repeat or 5)),
    }
    if which in singles:
        key, step = singles[which]
        data = step() | {"load_avg_1m": round(os.getloadavg()[0], 2)}
        if args.save:
            save_entry(key, data)
    else:
        suite = BENCH_DIR / "suite.json"
        data = run_suite(quick=args.quick, agents=args.agents or 1000)
        kept = json.loads(suite.read_text()) if suite.exists() else {}
        _save(kept | data, suite)  # a --quick run keeps the entries it did not re-measure
    if args.json or which != "all":
        sys.stdout.write(json.dumps(data) + "\n")
    return 0


def save_entry(key: str, data: dict[str, Any]) -> None:
    """Replace one benchmark's entry of ``bench/suite.json`` and regenerate RESULTS.md."""
    suite = BENCH_DIR / "suite.json"
    results = json.loads(suite.read_text()) if suite.exists() else {}
    results[key] = data
    _save(results, suite)


def _save(results: dict[str, Any], suite: Path) -> None:
    suite.write_text(json.dumps(results, indent=1) + "\n")
    write_results(results, BENCH_DIR / "RESULTS.md")
    console.print(f"wrote {suite} and the suite block of {BENCH_DIR / 'RESULTS.md'}")
