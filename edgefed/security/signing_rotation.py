"""``edgefed credentials rotate-signing-key``: a new signing key without a gap in trust.

Devices trust a set of keys (``trusted_global_keys``) and refuse every global and task no
trusted key signed, so the aggregator's key is changed in two steps:

1. ``rotate-signing-key`` makes a new pair in ``<dir>/signing/``, keeps the old public half
   there as ``previous.pub``, gives the aggregator's folder the new private key (owner-only,
   replaced atomically) and every device's folder both public keys, listed in its
   ``connection.toml``. The old private key is deleted. Devices then accept both keys, so it
   does not matter whether a device or the aggregator gets its new folder first.
2. ``rotate-signing-key --finish``, once every device and the aggregator run with their new
   folders, ends the grace period: ``previous.pub`` is removed everywhere and devices trust
   the new key alone.

A second rotation before ``--finish`` is refused: devices trust two keys, never three, and
one of them is always the key the aggregator signs with. Nothing secret is printed.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from edgefed.security.credentials import AGGREGATOR, CredentialsDir, trusted_keys_line
from edgefed.security.signing import key_id, load_private_key, load_public_key, write_keypair
from schemas.errors import ConfigError

_TRUSTED_LINE: Final = re.compile(r"^trusted_global_keys\s*=.*$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class SigningRotation:
    """What a rotation step did, in terms safe to print (fingerprints and paths only)."""

    key_id: str
    """Fingerprint of the key the aggregator signs with from now on."""
    previous_key_id: str | None
    """Fingerprint of the retired key devices still trust; None once the grace period ends."""
    devices: tuple[Path, ...]
    """Device folders rewritten: copy each to its device."""
    aggregator: Path
    """The aggregator's folder (holds the new private key)."""


def _write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with ``data``, readable by its owner from the first byte."""
    temporary = path.with_name(path.name + ".new")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    temporary.replace(path)


def _device_folders(layout: CredentialsDir) -> tuple[Path, ...]:
    devices = layout.root / "devices"
    if not devices.is_dir():
        return ()
    return tuple(sorted(p for p in devices.iterdir() if (p / "connection.toml").is_file()))


def _trust(layout: CredentialsDir, folder: Path) -> None:
    """Give a device folder exactly the public keys trusted now, and list them in its config."""
    (folder / layout.previous_public_key.name).unlink(missing_ok=True)
    line = trusted_keys_line(layout, folder)  # copies global.pub (and previous.pub)
    config = folder / "connection.toml"
    text = config.read_text(encoding="utf-8")
    if _TRUSTED_LINE.search(text):
        text = _TRUSTED_LINE.sub(lambda _: line, text, count=1)
    else:
        head, _, rest = text.partition("\n")
        text = f"{head}\n{line}\n{rest}"
    config.write_text(text, encoding="utf-8")


def rotate_signing_key(root: str | os.PathLike[str], *, finish: bool = False) -> SigningRotation:
    """Start a signing-key rotation, or with ``finish`` end its grace period (module docstring).

    Raises:
        ConfigError: ``root`` holds no signing key; a rotation is already under way (without
            ``finish``) or none is (with it).
    """
    layout = CredentialsDir(Path(root))
    layout._settings()  # a credentials folder at all?
    signing, previous = layout.signing, layout.previous_public_key
    if not (signing / "global.key").is_file():
        raise ConfigError(f"{signing} holds no signing key; run `edgefed credentials init`")
    aggregator = layout.identity(AGGREGATOR)
    if finish:
        if not previous.exists():
            raise ConfigError("no signing-key rotation is under way; nothing to finish")
        previous.unlink()
    else:
        if previous.exists():
            raise ConfigError(
                f"a rotation is under way ({previous} is still trusted); once every device "
                "and the aggregator run with their new folders, end it with --finish"
            )
        for leftover in ("next.key", "next.pub"):
            (signing / leftover).unlink(missing_ok=True)
        write_keypair(signing / "next.key", signing / "next.pub")
        shutil.copyfile(layout.public_key, previous)
        (signing / "next.pub").replace(layout.public_key)
        (signing / "next.key").replace(signing / "global.key")
        if aggregator.is_dir():
            _write_private(aggregator / "global.key", (signing / "global.key").read_bytes())
    devices = _device_folders(layout)
    for folder in devices:
        _trust(layout, folder)
    current = key_id(load_private_key(signing / "global.key").public_key())
    return SigningRotation(
        key_id=current,
        previous_key_id=key_id(load_public_key(previous)) if previous.exists() else None,
        devices=devices,
        aggregator=aggregator,
    )


def say_rotation(rotation: SigningRotation, say: Callable[[str], None]) -> None:
    """Tell the operator what to copy where and what comes next; fingerprints, no secrets."""
    devices = len(rotation.devices)
    if rotation.previous_key_id is None:
        say(f"signing key {rotation.key_id} is now the only key devices trust")
        say(f"copy the {devices} device folders under devices/ to their devices again")
        return
    say(f"new signing key {rotation.key_id}; devices trust it and {rotation.previous_key_id}")
    say(f"copy the {devices} device folders under devices/ to their devices, and")
    say(f"{rotation.aggregator} to the aggregator host, then restart the aggregator")
    say("once all run with their new folders, end the grace period with --finish")
