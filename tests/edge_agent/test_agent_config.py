"""An agent's config file is checked when it is loaded, trainer options included."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import AgentConfig
from edgefed.settings import load_settings
from schemas.errors import ConfigError

_HEAD = 'federation = "f"\nclient_id = "pi-1"\ndata = "synthetic"\n'


def _load(tmp_path: Path, text: str) -> AgentConfig:
    path = tmp_path / "agent.toml"
    path.write_text(_HEAD + text, encoding="utf-8")
    return load_settings(AgentConfig, path)


def test_trainer_options_of_the_agents_method_load(tmp_path: Path) -> None:
    config = _load(tmp_path, 'method = "lora"\n[trainer]\ngrad_clip = 0.5\nprecision = "auto"\n')
    assert config.trainer == {"grad_clip": 0.5, "precision": "auto"}


def test_a_misspelt_trainer_option_fails_at_load_and_names_the_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\['optimiser'\] belong to no trainer.*'optimizer'"):
        _load(tmp_path, '[trainer]\noptimiser = "sgd"\n')


def test_an_option_of_another_method_fails_when_the_method_is_fixed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\['cut'\] belong to no trainer of \['lora'\]"):
        _load(tmp_path, 'method = "lora"\n[trainer]\ncut = 2\n')


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('grad_clip = "high"', r"lora trainer options: grad_clip: Input should be a valid number"),
        ('mode = "backprop"', r"fwdgrad trainer options: mode: Input should be 'fd' or 'jvp'"),
        ('variant = "y_shaped"', r"split trainer options: variant"),
    ],
)
def test_a_value_a_trainer_would_refuse_fails_at_load(
    tmp_path: Path, table: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, f"[trainer]\n{table}\n")


def test_without_a_fixed_method_an_option_of_any_trainer_loads(tmp_path: Path) -> None:
    config = _load(tmp_path, "[trainer]\nlr = 20.0\ncut = 2\n")
    assert config.trainer == {"lr": 20.0, "cut": 2}
