"""``edgefed status``'s view of a federation, from the messages a broker hands over."""

from __future__ import annotations

from rich.console import Console

from edgefed.transport.frames import Delivery
from edgefed.watch import FederationWatch, render
from schemas import topics
from schemas.messages import DeviceProfile, Metrics, ModelRef, Status, Task


def test_the_view_joins_task_metrics_and_statuses() -> None:
    watch = FederationWatch("fed", clock=lambda: 1_000.0)
    task = Task(task_id="t", federation="fed", version=7, run_id="r1", model=ModelRef(name="tiny"))
    plan = {"method": "fwdgrad", "budget_mb": 512.0, "measured_mb": 300.5}
    news = [
        (topics.task("fed"), task),
        (topics.metrics("fed"), Metrics(version=9, time_s=3.0, eval_loss=0.5, eval_accuracy=0.8)),
        (
            topics.status("fed", "pi-2"),
            Status(client_id="pi-2", state="offline", heartbeat_at=900.0),
        ),
        (
            topics.status("fed", "pi-1"),
            Status(
                client_id="pi-1",
                state="training",
                plan=plan,
                base_version=6,
                updates_sent=4,
                accepted=3,
                rejected=1,
                profile=DeviceProfile(memory_budget_mb=512.0),
                heartbeat_at=990.0,
            ),
        ),
        (topics.metrics("other"), Metrics(version=99, time_s=1.0)),
    ]
    taken = [watch.take(Delivery(topic, message, 10)) for topic, message in news]
    assert taken == [True, True, True, True, False]
    view = watch.view()
    assert (view.run_id, view.version, view.method) == ("r1", 9, "lora")
    first = view.devices[0]
    assert [d.client_id for d in view.devices] == ["pi-1", "pi-2"]
    assert (first.method, first.memory_budget_mb, first.peak_mb) == ("fwdgrad", 512.0, 300.5)
    assert (first.staleness, first.accepted, first.rejected, first.seen_s_ago) == (3, 3, 1, 10.0)
    console = Console(record=True, width=160)
    console.print(render(view))
    text = console.export_text()
    assert "pi-1" in text and "training" in text and "version 9 " in text
