"""The scale run through a private Mosquitto: many real connections, nothing acked is lost."""

from __future__ import annotations

import pytest

from bench.scale import ScaleConfig, run_scale
from bench.scale_report import latency_summary, scale_table
from edgefed.transport.broker import MosquittoProcess


@pytest.mark.broker
async def test_scale_fifty_agents_lose_no_acked_update(
    mosquitto_process: MosquittoProcess,
) -> None:
    # Two agents' processes of 25 agents each, as a larger fleet is spread.
    config = ScaleConfig(
        agents=50,
        updates_per_agent=2,
        spread_s=1.0,
        buffer_size=10,
        recorded_updates=2,
        agents_per_process=25,
    )
    assert [len(share) for share in config.shares()] == [25, 25]
    result = await run_scale(
        config, url=mosquitto_process.url, broker_pid=mosquitto_process.pid, progress=False
    )
    assert result.updates_sent == 100
    assert result.updates_accepted == 100, result.to_json()
    assert result.updates_unanswered == 0
    assert result.lost == 0
    assert result.merged_twice_or_more == 0
    # 100 updates in buffers of 10: every one merged, once, in 10 versions.
    assert result.merged_once == 100
    assert result.buffered == 0
    assert result.versions == 10
    assert result.ok
    # The audit log's merge entries name every accepted update: one lag per update.
    assert len(result.merge_lags_s) == 100
    assert all(lag > 0 for lag in result.merge_lags_s)
    assert result.broker_rss_peak_mb is not None
    assert result.broker_rss_peak_mb > 0
    assert result.agents_rss_mb is not None
    # The tiny model's LoRA (r=8 on q, v of 2 layers, hidden 64), float32.
    assert result.update_bytes == 2 * 2 * (8 * 64 + 64 * 8) * 4
    assert "zero lost" in str(scale_table(result).columns[0]._cells)


def test_latency_summary_percentiles_in_ms() -> None:
    summary = latency_summary([i / 1000 for i in range(1, 101)])
    assert summary["p50"] == pytest.approx(50.5, abs=0.1)
    assert summary["p99"] == pytest.approx(99.0, abs=0.1)
    assert summary["max"] == 100.0
    assert latency_summary([]) == {}
    assert latency_summary([0.25]) == {"p50": 250.0, "p90": 250.0, "p99": 250.0, "max": 250.0}
