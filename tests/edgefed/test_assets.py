"""Packaged assets: where they are looked for, and one clear message when they are not there."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefed import assets
from edgefed.cli.main import main
from edgefed.data.loading import load_data
from edgefed.ml.models import build_model, load_tokenizer, model_folder
from schemas.errors import AssetMissing, ConfigError
from tests.assets_helpers import require_minilm, require_smollm2


def test_cache_dir_follows_env_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEFED_CACHE_DIR", str(tmp_path / "mine"))
    assert assets.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("EDGEFED_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "edgefed"


def test_unconverted_smollm2_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEFED_CACHE_DIR", str(tmp_path))
    with pytest.raises(AssetMissing, match="run `edgefed assets`") as caught:
        build_model("smollm2-135m")
    assert caught.value.asset == "smollm2-135m"
    assert isinstance(caught.value, ConfigError)
    with pytest.raises(AssetMissing):
        load_data("rotten-tomatoes:split=test", seq_len=32, model="smollm2-135m")


def test_uninstalled_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(assets, "package_dir", lambda module: None)
    for find in (assets.minilm_dir, assets.rotten_tomatoes_csv, assets.smollm2_gguf):
        with pytest.raises(AssetMissing, match="edgefed assets"):
            find()


def test_demo_without_assets_prints_one_line_and_exits_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("EDGEFED_CACHE_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["demo"]) == 2
    out = capsys.readouterr()
    lines = (out.out + out.err).strip().splitlines()
    assert len(lines) == 1 and "edgefed assets" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_local_folders_and_unknown_names(tmp_path):
    with pytest.raises(ConfigError, match="unknown model"):
        model_folder(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"no config\.json"):
        model_folder(str(tmp_path))
    with pytest.raises(ConfigError, match="has no tokenizer"):
        load_tokenizer("tiny")


def test_prepare_without_install_reports_every_asset_when_present():
    require_smollm2()
    require_minilm()
    found = assets.prepare(install=False)  # converted already: only looks
    assert set(found) == {"smollm2-135m", "minilm-l6", "rotten-tomatoes"}
    assert all(Path(p).exists() for p in found.values())
    assert (found["smollm2-135m"] / "tokenizer.json").is_file()


def test_cli_finds_asset_missing_inside_task_group_errors():
    from edgefed.cli.main import _config_problem

    missing = AssetMissing("x", "not here", "edgefed assets")
    nested = ExceptionGroup("outer", [ValueError("a"), ExceptionGroup("inner", [missing])])
    assert _config_problem(nested) is missing
    assert _config_problem(ExceptionGroup("g", [ValueError("a")])) is None


def test_asset_packages_are_the_locked_ones_and_converters_the_assets_extra():
    """`edgefed assets` outside a checkout installs what `make` installs from the lock."""
    import tomllib

    root = Path(__file__).resolve().parents[2]
    locked = {
        line.split(" ")[0]
        for line in (root / "requirements" / "assets.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    assert set(assets.ASSET_PACKAGES) == locked
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert set(assets.CONVERTER_PACKAGES) == set(extra["optional-dependencies"]["assets"])
