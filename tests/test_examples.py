"""Every file in examples/ loads as the command it names would load it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aggregator.config import AggregatorConfig
from edge_agent.config import AgentConfig
from edgefed.settings import load_settings

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
KINDS: dict[str, type[AgentConfig] | type[AggregatorConfig]] = {
    "agent": AgentConfig,
    "aggregator": AggregatorConfig,
}


def _files() -> list[Path]:
    return sorted(EXAMPLES.glob("*.toml"))


def test_there_are_examples_of_both_commands() -> None:
    kinds = {path.stem.split("-")[0] for path in _files()}
    assert kinds == set(KINDS)


@pytest.mark.parametrize("path", _files(), ids=lambda path: path.name)
def test_an_example_loads_with_the_command_it_names(path: Path) -> None:
    command = path.read_text(encoding="utf-8").splitlines()[0]
    assert command == f"# edgefed {path.stem.split('-')[0]} --config examples/{path.name}"
    config = load_settings(KINDS[path.stem.split("-")[0]], path)
    assert config.federation == "reviews"
    assert config.mqtt.url == "mqtts://broker.example.org:8883"


UNITS = sorted((EXAMPLES / "systemd").glob("*.service"))


def test_there_are_units_for_both_services() -> None:
    assert [unit.name for unit in UNITS] == ["edgefed-agent@.service", "edgefed-aggregator.service"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_a_unit_passes_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    """systemd parses every line; a warning (an unknown key, a bad value) fails the test."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    edgefed = Path(sys.executable).with_name("edgefed")  # the installed command, not /opt's
    text = unit.read_text(encoding="utf-8").replace("/opt/edgefed/venv/bin/edgefed", str(edgefed))
    name = unit.name.replace("@.", "@pi4-kitchen.")  # a template is verified as an instance
    (tmp_path / name).write_text(text, encoding="utf-8")
    done = subprocess.run(
        [analyze, "verify", str(tmp_path / name)], capture_output=True, text=True, check=False
    )
    assert (done.returncode, done.stderr) == (0, ""), done.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_a_unit_sets_only_keys_its_command_has(unit: Path) -> None:
    """Its ``EDGEFED_*`` variables name settings the command reads (or the model cache)."""
    settings = AgentConfig if "agent" in unit.name else AggregatorConfig
    keys = {
        line.split("=", 2)[1].removeprefix("EDGEFED_").split("__")[0].lower()
        for line in unit.read_text(encoding="utf-8").splitlines()
        if line.startswith("Environment=EDGEFED_")
    }
    assert keys - {"cache_dir"} <= set(settings.model_fields)
    assert "mqtt" in keys
