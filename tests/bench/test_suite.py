"""The benchmark suite: merge shapes, the raw-vs-end-to-end harness, the RESULTS.md block."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from bench import suite
from bench.merge import bench_merges, lora_shapes
from bench.suite import END, START, markdown, write_results
from bench.throughput import PAYLOAD_BYTES, e2e_trial, process_cpu_s, raw_trial
from bench.throughput_replicas import replicas_trial
from edgefed.ml.models import model_folder
from edgefed.transport.broker import MosquittoProcess
from schemas.errors import AssetMissing, ConfigError


def _smollm2_installed() -> bool:
    try:
        model_folder("smollm2-135m")
    except (AssetMissing, ConfigError):
        return False
    return True


@pytest.mark.skipif(not _smollm2_installed(), reason="SmolLM2 is not installed (edgefed assets)")
def test_lora_shapes_match_smollm2_q_v_rank8() -> None:
    shapes = lora_shapes("smollm2-135m")
    assert len(shapes) == 30 * 2 * 2
    assert shapes["model.layers.0.self_attn.q_proj.lora_B.weight"] == (576, 8)
    assert shapes["model.layers.29.self_attn.v_proj.lora_B.weight"] == (192, 8)
    total = sum(a * b for a, b in shapes.values()) * 4
    assert total == 1_843_200  # the ~1.8 MB the merge target is stated for


@pytest.mark.skipif(not _smollm2_installed(), reason="SmolLM2 is not installed (edgefed assets)")
def test_bench_merges_reports_both_strategies() -> None:
    results = bench_merges(updates=10, rounds=1, buffer_size=5)
    assert [r.strategy for r in results] == ["fedbuff K=5", "fedasync"]
    assert all(r.merges_per_s > 0 and r.update_bytes == 1_843_200 for r in results)


@pytest.mark.broker
async def test_raw_and_end_to_end_trials_move_every_update(
    mosquitto_process: MosquittoProcess,
) -> None:
    pid = mosquitto_process.pid
    raw = await raw_trial(mosquitto_process.url, count=4, publishers=2, broker_pid=pid)
    # e2e_trial itself checks every update was merged exactly once before returning.
    e2e = await e2e_trial(
        mosquitto_process.url, count=4, publishers=2, buffer_size=2, broker_pid=pid
    )
    first = await e2e_trial(
        mosquitto_process.url, count=4, publishers=2, buffer_size=2, encode_first=True
    )
    assert min(raw.mbps, e2e.mbps, first.mbps) > 0
    # The receiver's CPU is its own process's: the publishers run in another one.
    assert 0 < raw.receiver_cpu_ms < 1000 and 0 < e2e.receiver_cpu_ms < 1000
    # The publishers' process reports its own CPU; the broker's is read from /proc, and
    # not at all without a pid.
    assert 0 < raw.publishers_cpu_ms < 1000 and 0 < e2e.publishers_cpu_ms < 1000
    assert raw.broker_cpu_ms is not None and e2e.total_cpu_ms is not None
    assert e2e.total_cpu_ms > e2e.receiver_cpu_ms + e2e.publishers_cpu_ms - 1e-9
    assert first.broker_cpu_ms is None and first.total_cpu_ms is None
    assert PAYLOAD_BYTES == 1024 * 1024


@pytest.mark.broker
async def test_replica_trial_merges_every_device_update_once_behind_two_replicas(
    mosquitto_process: MosquittoProcess,
) -> None:
    # replicas_trial checks every device update was merged exactly once before returning.
    trial = await replicas_trial(
        mosquitto_process.url, count=4, publishers=2, broker_pid=mosquitto_process.pid
    )
    assert trial.mbps > 0 and 0 < trial.receiver_cpu_ms < 1000
    assert trial.replicas_cpu_ms is not None and trial.replicas_cpu_ms > 0
    assert trial.total_cpu_ms is not None and trial.total_cpu_ms > trial.replicas_cpu_ms


def _results() -> dict[str, object]:
    return {
        "merges": {
            "results": [
                {"strategy": "fedbuff K=10", "update_bytes": 1843200, "tensors": 120,
                 "merges_per_s": 300.0, "rounds": [300.0]},
            ]
        },
        "time_to_target": {"skipped": "no fleet file"},
    }  # fmt: skip


def test_results_block_replaced_in_place_and_rest_kept(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text("# Codec\n\nkept above\n")
    write_results(_results(), path)
    first = path.read_text()
    assert first.startswith("# Codec\n\nkept above\n")
    assert "| 300/s | 1.50x of the 200/s target |" in first
    assert "not measured: no fleet file" in first
    path.write_text(first + "\n# Split\n\nkept below\n")
    write_results(_results(), path)
    second = path.read_text()
    assert second.count(START) == 1
    assert second.count(END) == 1
    assert second.endswith("# Split\n\nkept below\n")
    assert markdown(_results()) in second


def test_process_cpu_s_reads_a_running_process_and_nothing_else() -> None:
    if not Path(f"/proc/{os.getpid()}/stat").exists():
        pytest.skip("no /proc on this system")
    first = process_cpu_s(os.getpid())
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    second = process_cpu_s(os.getpid())
    assert first is not None and second is not None and second > first
    assert process_cpu_s(None) is None
    assert process_cpu_s(2**22 + 12345) is None  # above the default pid_max


def test_save_entry_replaces_one_benchmark_and_keeps_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(suite, "BENCH_DIR", tmp_path)
    (tmp_path / "suite.json").write_text(json.dumps(_results()))
    row = {"size_bytes": 1 << 20, "roundtrip_gbps": 30.0, "memcpy_gbps": 50.0}
    suite.save_entry("codec", {"results": [row | {"ratio_vs_memcpy": 0.6}]})
    saved = json.loads((tmp_path / "suite.json").read_text())
    assert saved["codec"]["results"][0]["ratio_vs_memcpy"] == 0.6
    assert saved["merges"] == _results()["merges"]
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| codec round trip vs memcpy, 1,024 KiB | 30.00 vs 50.00 GB/s | 0.60x |" in text
    assert "| 300/s | 1.50x of the 200/s target |" in text


def test_markdown_of_committed_suite_is_the_committed_results_block() -> None:
    bench_dir = Path(suite.__file__).resolve().parent
    results = json.loads((bench_dir / "suite.json").read_text())
    committed = (bench_dir / "RESULTS.md").read_text()
    block = markdown(results)
    assert block.startswith(START) and block.endswith(END)
    assert block in committed
