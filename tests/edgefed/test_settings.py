"""A command's settings: TOML file, then ``EDGEFED_*`` variables, then flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import AgentConfig
from edgefed.settings import load_settings
from schemas.errors import ConfigError


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_a_variable_overrides_the_file_and_a_flag_overrides_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(
        tmp_path / "agent.toml",
        'federation = "f"\nclient_id = "pi-1"\ndata = "synthetic"\nmax_updates = 3\n',
    )
    assert load_settings(AgentConfig, path).max_updates == 3
    monkeypatch.setenv("EDGEFED_MAX_UPDATES", "7")
    monkeypatch.setenv("EDGEFED_MQTT__URL", "mqtt://10.0.0.2:1883")
    from_env = load_settings(AgentConfig, path)
    assert (from_env.max_updates, from_env.mqtt.url) == (7, "mqtt://10.0.0.2:1883")
    assert load_settings(AgentConfig, path, max_updates=9).max_updates == 9
    # Built in code (the simulator's agents), a config takes only what it is given.
    assert AgentConfig(federation="f", client_id="c", data="synthetic").max_updates == 0


def test_a_missing_or_unknown_key_is_named_with_where_to_set_it(tmp_path: Path) -> None:
    path = _write(tmp_path / "agent.toml", 'federation = "f"\nclient_idd = "pi-1"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(AgentConfig, path)
    message = str(caught.value)
    assert (
        "client_id: missing; set it in the file, as --client-id or as EDGEFED_CLIENT_ID" in message
    )
    assert f"client_idd: unknown key in {path}" in message
    assert "data: missing" in message


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read configuration .*nothing.toml"):
        load_settings(AgentConfig, tmp_path / "nothing.toml")
    broken = _write(tmp_path / "broken.toml", "federation = \n")
    with pytest.raises(ConfigError, match=r"cannot read configuration .*broken.toml"):
        load_settings(AgentConfig, broken)


def test_the_command_names_a_missing_key_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgefed.cli.main import main

    assert main(["aggregator", "--config", str(_write(tmp_path / "a.toml", ""))]) == 2
    err = capsys.readouterr().err
    assert "edgefed aggregator: invalid configuration for AggregatorConfig in" in err
    assert (
        "federation: missing; set it in the file, as --federation or as EDGEFED_FEDERATION" in err
    )
    assert "Traceback" not in err
