"""Watching a running federation three ways: Prometheus, ``edgefed status`` and the dashboard.

One federation of real processes (``edgefed aggregator`` with ``metrics_port``, two
``edgefed agent``) against a private Mosquitto with its WebSocket listener; the dashboard is
loaded in headless Chromium (Debian's ``chromium`` and ``chromium-driver``) through Selenium.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import shutil
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.wait import WebDriverWait

from edgefed.cli.main import COMMANDS, build_parser
from edgefed.dashboard.server import DashboardServer
from edgefed.transport.broker import MosquittoProcess, free_port, mosquitto_binary
from tests.conftest import _missing
from tests.system.conftest import tiny_federation

pytestmark = [pytest.mark.broker, pytest.mark.slow]

DASHBOARD = Path(__file__).resolve().parents[2] / "examples" / "grafana" / "edgefed-federation.json"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def broker() -> Iterator[MosquittoProcess]:
    if mosquitto_binary() is None:
        _missing("the mosquitto binary is not installed")
    with MosquittoProcess(websockets=True) as broker:
        yield broker


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        _missing("Debian's chromium and chromium-driver are not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(str(driver)), options=options)
    try:
        yield browser
    finally:
        browser.quit()


def _scrape(port: int) -> Samples:
    """Every sample of the endpoint, by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _page(browser: webdriver.Chrome) -> tuple[int, dict[str, str]]:
    """The version the dashboard shows, and each device row's state (read in one go)."""
    version, rows = browser.execute_script(
        "return [document.getElementById('version').textContent,"
        " [...document.querySelectorAll('#devices tbody tr')]"
        ".map((row) => [row.dataset.device, row.dataset.state])]"
    )
    return (int(version) if str(version).isdigit() else -1), dict(rows)


async def _status(broker: MosquittoProcess, federation: str) -> dict[str, object]:
    args = build_parser().parse_args(
        ["status", "--broker", broker.url, "--federation", federation, "--json"]
    )
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert await asyncio.to_thread(COMMANDS["status"].run, args) == 0
    view: dict[str, object] = json.loads(output.getvalue())
    return view


async def test_a_running_federation_seen_three_ways(
    broker: MosquittoProcess, browser: webdriver.Chrome, tmp_path: Path, federation: str
) -> None:
    port = free_port()
    fed = tiny_federation(
        tmp_path, broker.url, federation, aggregator={"metrics_port": port}, agent={}
    )
    aggregator, agents = fed.aggregator, fed.agents
    try:
        aggregator.start()
        while "Prometheus metrics on" not in aggregator.text():
            assert aggregator.running, aggregator.text()
            await asyncio.sleep(0.1)
        before = _scrape(port)
        for agent in agents:
            agent.start()
        ws_url = f"ws://127.0.0.1:{broker.websockets_port}"
        with DashboardServer(federation, ws_url) as page:
            browser.get(page.url)
            wait = WebDriverWait(browser, 90, poll_frequency=0.2)
            online = {"dev0", "dev1"}
            wait.until(lambda b: _page(b)[0] >= 1 and {
                d for d, state in _page(b)[1].items() if state != "offline"} == online)  # fmt: skip
            first, states = _page(browser)
            wait.until(lambda b: _page(b)[0] >= first + 2)
            later, _ = _page(browser)
            browser.save_screenshot(str(tmp_path / "dashboard.png"))
        status = await _status(broker, federation)
        for agent in agents:
            assert agent.popen is not None
            agent.popen.send_signal(signal.SIGTERM)
        for agent in agents:
            assert await agent.exited(60) == 0, agent.text()
        await asyncio.sleep(1.0)  # the agents' offline statuses reach the aggregator
        after = _scrape(port)
        assert aggregator.popen is not None
        aggregator.popen.send_signal(signal.SIGTERM)
        assert await aggregator.exited(60) == 0, aggregator.text()
    finally:
        for proc in (aggregator, *agents):
            proc.cleanup()
    # The dashboard: every device online, the version rising.
    assert later > first >= 1, (first, later, states)
    # edgefed status --json: both devices, at a version the dashboard had seen.
    devices = status["devices"]
    assert isinstance(devices, list) and [d["client_id"] for d in devices] == ["dev0", "dev1"]
    assert all(d["state"] != "offline" and d["method"] in (None, "lora") for d in devices)
    assert isinstance(status["version"], int) and status["version"] >= later
    # Prometheus, against the results file written at exit.
    results = json.loads((tmp_path / "results.json").read_text())
    accepted = [u for u in results["updates"] if u["accepted"]]
    fed = (("federation", federation),)
    assert before[("edgefed_global_version", fed)] == 0
    assert after[("edgefed_global_version", fed)] == results["history"][-1]["version"] >= later
    by_method = (("decision", "accepted"), *fed, ("method", "lora"), ("reason", ""))
    assert after[("edgefed_updates_total", by_method)] == len(accepted) > 0
    assert after[("edgefed_update_staleness_count", fed)] == len(accepted)
    assert after[("edgefed_merge_seconds_count", fed)] == len(accepted)
    assert after[("edgefed_agents", (*fed, ("state", "offline")))] == 2
    assert after[("edgefed_bytes_received_total", fed)] >= sum(u["bytes"] for u in accepted)
    # The Grafana dashboard asks only for series the endpoint has.
    used = set(
        re.findall(r"edgefed_[a-z_]+", json.dumps(json.loads(DASHBOARD.read_text())["panels"]))
    )
    assert used and used <= {name for name, _ in after}, used - {name for name, _ in after}
