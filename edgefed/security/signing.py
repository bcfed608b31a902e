"""Signed globals and tasks: the aggregator signs both, agents verify before acting on them.

The ACL already stops devices from publishing on ``global`` (docs/architecture.md §8); the signature
also covers a compromised or misconfigured broker, a bridge, or a retained message left over from
another deployment. Ed25519 (through the ``cryptography`` package) keeps keys and signatures
small (32 and 64 bytes) and verification fast enough for a Raspberry Pi.

What is signed is :func:`global_digest`, a SHA-256 over a domain tag and, in this order::

    "edgefed/global-model/v2" LF
    lp(federation) lp(task_id) lp(run_id) u64(version) u32(number of tensors)
    for each tensor, by name in code-point order:
        lp(name) lp(dtype) u32(ndim) u64(dim) for each dim, u64(nbytes) raw bytes

where ``lp(s)`` is ``u32(len(utf8(s))) utf8(s)``, integers are little-endian, ``dtype`` is the
torch name without ``torch.`` (``float32``) and the raw bytes are the C-contiguous tensor as
the codec sends it (little-endian). The federation is not in the message but in its topic:
signing it stops a global of one federation being replayed into another under the same key.
Signing the run id stops a global of an earlier run being relabelled as the current run's
(v1 had no run id). ``created_at`` is informational and not covered.

The task tells devices what to train, at which learning rate, on which proxy rows, so it is
signed with the same key. :func:`task_digest` is a SHA-256 over::

    "edgefed/task/v1" LF lp(federation) lp(canonical JSON of the task)

where the canonical JSON is every field but ``signature`` and ``created_at`` (``model_dump``
in JSON mode), keys sorted, no whitespace, ASCII only. Domain tags keep a global's signature
from ever passing as a task's and the other way round.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Final, TypeVar

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from schemas.errors import ConfigError, SignatureError, SignedKind
from schemas.messages import GlobalModel, Task, TensorMap

DOMAIN: Final = b"edgefed/global-model/v2\n"
"""Tag that makes a global's digest unlike any other digest signed with the same key."""
TASK_DOMAIN: Final = b"edgefed/task/v1\n"
"""Tag that makes a task's digest unlike any other digest signed with the same key."""
_UNSIGNED_TASK_FIELDS: Final = frozenset({"signature", "created_at"})

Signed = TypeVar("Signed", GlobalModel, Task)
"""The messages the aggregator signs."""


def _lp(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<I", len(raw)) + raw


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


def global_digest(
    *, federation: str, task_id: str, version: int, tensors: TensorMap, run_id: str = ""
) -> bytes:
    """The 32-byte SHA-256 that a global's signature covers (layout in the module docstring)."""
    digest = hashlib.sha256(DOMAIN)
    head = _lp(federation) + _lp(task_id) + _lp(run_id)
    digest.update(head + struct.pack("<QI", version, len(tensors)))
    for name in sorted(tensors):
        tensor = tensors[name]
        dtype = str(tensor.dtype).removeprefix("torch.")
        shape = tuple(tensor.shape)
        data = _tensor_bytes(tensor)
        digest.update(
            _lp(name)
            + _lp(dtype)
            + struct.pack(f"<I{len(shape)}QQ", len(shape), *shape, data.nbytes)
        )
        digest.update(data)
    return digest.digest()


def task_digest(task: Task, *, federation: str) -> bytes:
    """The 32-byte SHA-256 that a task's signature covers (layout in the module docstring)."""
    fields = task.model_dump(mode="json", exclude=set(_UNSIGNED_TASK_FIELDS))
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(TASK_DOMAIN + _lp(federation) + _lp(canonical)).digest()


def _digest_of(message: GlobalModel | Task, federation: str) -> bytes:
    if isinstance(message, Task):
        return task_digest(message, federation=federation)
    return global_digest(
        federation=federation,
        task_id=message.task_id,
        version=message.version,
        tensors=message.tensors,
        run_id=message.run_id,
    )


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short fingerprint of a public key, for logs and error messages (never a secret)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read an unencrypted PKCS#8 PEM Ed25519 private key.

    Raises:
        ConfigError: The file cannot be read or holds no Ed25519 private key.
    """
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot load the signing key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Read a PEM Ed25519 public key (SubjectPublicKeyInfo).

    Raises:
        ConfigError: The file cannot be read or holds no Ed25519 public key.
    """
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the public key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def write_keypair(private_path: Path, public_path: Path) -> Ed25519PublicKey:
    """Create a fresh signing key pair; the private half is written readable by its owner only.

    Raises:
        ConfigError: A file already exists there (keys are never silently replaced).
    """
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} exists; move it away to make a new key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public = key.public_key()
    public_path.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return public


class GlobalSigner:
    """The aggregator's half: signs every global version and task it publishes."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.key_id = key_id(key.public_key())

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> GlobalSigner:
        """Load the private key at ``path`` (see :func:`load_private_key`)."""
        return cls(load_private_key(path))

    def __repr__(self) -> str:
        return f"GlobalSigner(key_id={self.key_id})"

    def sign(self, message: Signed, *, federation: str) -> Signed:
        """A copy of ``message`` carrying the signature over its digest in ``federation``."""
        signature = self._key.sign(_digest_of(message, federation))
        return message.model_copy(update={"signature": signature})


class GlobalVerifier:
    """The agent's half: accepts a global or task only when a trusted key signed its content.

    Several keys may be trusted at once, so the aggregator's key can be rotated without
    stopping devices: trust old and new, switch the aggregator, then drop the old one.
    """

    def __init__(self, keys: Iterable[Ed25519PublicKey]) -> None:
        self._keys = tuple(keys)
        if not self._keys:
            raise ConfigError("a signature verifier needs at least one trusted public key")
        self.key_ids = tuple(key_id(key) for key in self._keys)

    @classmethod
    def from_files(cls, paths: Iterable[str | os.PathLike[str]]) -> GlobalVerifier:
        """Trust the public keys in ``paths`` (see :func:`load_public_key`)."""
        return cls(load_public_key(path) for path in paths)

    def __repr__(self) -> str:
        return f"GlobalVerifier(key_ids={self.key_ids})"

    def verify(self, message: GlobalModel | Task, *, federation: str) -> None:
        """Return when a trusted key signed ``message`` for ``federation``.

        Raises:
            SignatureError: ``unsigned`` when there is no signature, ``bad_signature`` when
                no trusted key made it (tampered content, another key, another federation).
        """
        subject: SignedKind = "task" if isinstance(message, Task) else "global"
        if message.signature is None:
            raise SignatureError(
                "unsigned",
                version=message.version,
                subject=subject,
                detail=f"the {subject} carries no signature and unsigned ones are not accepted",
            )
        digest = _digest_of(message, federation)
        for key in self._keys:
            try:
                key.verify(message.signature, digest)
            except InvalidSignature:
                continue
            return
        raise SignatureError(
            "bad_signature",
            version=message.version,
            subject=subject,
            detail=(
                f"no trusted key ({', '.join(self.key_ids)}) signed this content for "
                f"federation {federation!r}; it was altered or signed by another key"
            ),
        )


def signed_by(signer: GlobalSigner | None, message: Signed, *, federation: str) -> Signed:
    """``message`` signed by ``signer``, or as it is when the deployment signs nothing."""
    return message if signer is None else signer.sign(message, federation=federation)
