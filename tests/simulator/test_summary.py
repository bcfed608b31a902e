"""The demo's headline numbers, table and plots, from a results file's layout."""

from __future__ import annotations

from rich.console import Console

from simulator.summary import plot_accuracy, plot_staleness, summarize, summary_table


def _update(client: str, staleness: int, *, accepted: bool = True) -> dict[str, object]:
    return {"client_id": client, "staleness": staleness, "bytes": 1000, "accepted": accepted}


RESULTS = {
    "history": [{"version": 0}, {"version": 1}, {"version": 2}],
    "updates": [
        _update("a", 0),
        _update("b", 1),
        _update("a", 3),
        _update("c", 9, accepted=False),
    ],
    "agents": [{"bytes_down": 5000}, {"bytes_down": 7000}, {"bytes_down": 0}],
}


def test_summarize_counts_bytes_and_staleness_of_accepted_updates():
    summary = summarize(
        RESULTS,
        model="m",
        dataset="d",
        base_accuracy=0.7,
        final_accuracy=0.8,
        held_out=500,
        device_steps=32,
        train_s=10.0,
        wall_s=12.0,
    )
    assert (summary.versions, summary.accepted, summary.rejected) == (2, 3, 1)
    assert (summary.bytes_up, summary.bytes_down, summary.agents) == (4000, 12000, 3)
    assert summary.mean_staleness == 4 / 3 and summary.max_staleness == 3
    console = Console(record=True, width=100)
    console.print(summary_table(summary))
    text = console.export_text()
    assert "0.700" in text and "0.800" in text and "3 / 1" in text and "0.0 MB" in text
    assert "mean of versions" not in text  # the final model is the last version


def test_summary_table_names_the_versions_a_tail_average_holds():
    common = {
        "model": "m", "dataset": "d", "base_accuracy": 0.7, "final_accuracy": 0.8,
        "held_out": 400, "device_steps": 32, "train_s": 10.0, "wall_s": 12.0,
    }  # fmt: skip
    console = Console(record=True, width=100)
    averaged = summarize(RESULTS, **common, averaged_versions=[1, 2])
    console.print(summary_table(averaged))
    assert "= mean of versions 1, 2" in console.export_text()
    assert "last alone" not in console.export_text()
    scored = summarize(RESULTS, **common, averaged_versions=[1, 2], last_version_accuracy=0.75)
    console.print(summary_table(scored))
    assert "last alone 0.750" in console.export_text()


def test_plots_are_written_as_png(tmp_path):
    points = [
        {"version": 0, "time_s": 0.0, "accuracy": 0.7},
        {"version": 5, "time_s": 30.0, "accuracy": 0.8},
    ]
    for path in (
        plot_accuracy(points, tmp_path / "acc.png", title="t"),
        plot_staleness(RESULTS, tmp_path / "stale.png"),
    ):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
