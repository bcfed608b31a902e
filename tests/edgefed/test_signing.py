"""Signed globals and tasks: what the signature covers, and every way one is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefed.security.signing import (
    GlobalSigner,
    GlobalVerifier,
    global_digest,
    load_private_key,
    load_public_key,
    signed_by,
    task_digest,
    write_keypair,
)
from schemas import codec
from schemas.errors import ConfigError, SignatureError
from schemas.messages import GlobalModel, ModelRef, ProxySpec, Task, TrainSpec

FED = "fed-a"


def _global(version: int = 3) -> GlobalModel:
    generator = torch.Generator().manual_seed(version)
    return GlobalModel(
        task_id="task-1",
        version=version,
        tensors={
            "layers.0.q_proj.lora_A": torch.randn(4, 16, generator=generator),
            "layers.0.q_proj.lora_B": torch.randn(16, 4, generator=generator),
        },
    )


@pytest.fixture
def signer() -> GlobalSigner:
    return GlobalSigner(Ed25519PrivateKey.generate())


def _verifier_for(signer: GlobalSigner) -> GlobalVerifier:
    return GlobalVerifier([signer._key.public_key()])


def test_signing_signed_global_verifies_after_the_wire(signer: GlobalSigner) -> None:
    signed = signer.sign(_global(), federation=FED)
    assert signed.signature is not None and len(signed.signature) == 64
    received = codec.decode(codec.encode(signed))
    assert isinstance(received, GlobalModel)
    _verifier_for(signer).verify(received, federation=FED)


def test_signing_tampered_tensor_is_refused(signer: GlobalSigner) -> None:
    signed = signer.sign(_global(), federation=FED)
    tensors = {name: tensor.clone() for name, tensor in signed.tensors.items()}
    tensors["layers.0.q_proj.lora_B"][3, 1] += 1e-3  # one coordinate, slightly
    tampered = signed.model_copy(update={"tensors": tensors})
    with pytest.raises(SignatureError) as caught:
        _verifier_for(signer).verify(tampered, federation=FED)
    assert caught.value.problem == "bad_signature"
    assert caught.value.version == 3


@pytest.mark.parametrize(
    "change",
    [
        {"version": 4},
        {"task_id": "task-2"},
        {"created_at": 0.0},  # informational, deliberately not covered
    ],
)
def test_signing_metadata_is_covered_except_created_at(
    signer: GlobalSigner, change: dict[str, object]
) -> None:
    signed = signer.sign(_global(), federation=FED)
    changed = signed.model_copy(update=change)
    verifier = _verifier_for(signer)
    if "created_at" in change:
        verifier.verify(changed, federation=FED)
        return
    with pytest.raises(SignatureError, match="bad_signature"):
        verifier.verify(changed, federation=FED)


def test_signing_other_federation_or_wrong_key_is_refused(signer: GlobalSigner) -> None:
    signed = signer.sign(_global(), federation=FED)
    with pytest.raises(SignatureError, match="bad_signature"):
        _verifier_for(signer).verify(signed, federation="fed-b")
    rogue = GlobalSigner(Ed25519PrivateKey.generate()).sign(_global(), federation=FED)
    with pytest.raises(SignatureError, match="no trusted key") as caught:
        _verifier_for(signer).verify(rogue, federation=FED)
    assert caught.value.problem == "bad_signature"


def test_signing_unsigned_global_is_refused(signer: GlobalSigner) -> None:
    with pytest.raises(SignatureError) as caught:
        _verifier_for(signer).verify(_global(), federation=FED)
    assert caught.value.problem == "unsigned"
    assert "no signature" in str(caught.value)


def test_signing_digest_covers_dtype_and_shape_not_dict_order() -> None:
    base = _global().tensors
    reordered = dict(reversed(list(base.items())))
    digest = global_digest(federation=FED, task_id="t", version=1, tensors=base)
    assert digest == global_digest(federation=FED, task_id="t", version=1, tensors=reordered)
    name = "layers.0.q_proj.lora_A"
    as_half = base | {name: base[name].half()}
    reshaped = base | {name: base[name].reshape(16, 4)}
    assert digest != global_digest(federation=FED, task_id="t", version=1, tensors=as_half)
    assert digest != global_digest(federation=FED, task_id="t", version=1, tensors=reshaped)
    # A name and a value cannot trade bytes: every field is length-prefixed.
    moved = {"ab": torch.zeros(1)}
    other = {"a": torch.zeros(1)}
    assert global_digest(federation="x", task_id="t", version=1, tensors=moved) != (
        global_digest(federation="x", task_id="tb", version=1, tensors=other)
    )


def test_signing_verifier_trusts_several_keys_for_rotation(tmp_path: Path) -> None:
    old_pub = write_keypair(tmp_path / "old.key", tmp_path / "old.pub")
    new_pub = write_keypair(tmp_path / "new.key", tmp_path / "new.pub")
    assert (tmp_path / "old.key").stat().st_mode & 0o077 == 0
    verifier = GlobalVerifier.from_files([tmp_path / "old.pub", tmp_path / "new.pub"])
    for name in ("old", "new"):
        signed = GlobalSigner.from_file(tmp_path / f"{name}.key").sign(_global(), federation=FED)
        verifier.verify(signed, federation=FED)
    assert len(verifier.key_ids) == 2
    assert old_pub != new_pub


def test_signing_keys_are_checked_when_loaded(tmp_path: Path) -> None:
    write_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    with pytest.raises(ConfigError, match="exists"):
        write_keypair(tmp_path / "k.key", tmp_path / "other.pub")
    with pytest.raises(ConfigError, match="public key"):
        load_public_key(tmp_path / "k.key")
    with pytest.raises(ConfigError, match="signing key"):
        load_private_key(tmp_path / "k.pub")
    with pytest.raises(ConfigError, match="at least one"):
        GlobalVerifier([])
    assert isinstance(load_private_key(tmp_path / "k.key"), Ed25519PrivateKey)


def _task(**change: object) -> Task:
    task = Task(
        task_id="task-1",
        federation=FED,
        version=3,
        model=ModelRef(name="tiny"),
        train=TrainSpec(lr=5e-3, local_steps=4),
        proxy=ProxySpec(dataset="synthetic", indices=(1, 5, 9), slice_id=3),
    )
    return task.model_copy(update=change)


def test_signing_signed_task_verifies_after_the_wire(signer: GlobalSigner) -> None:
    signed = signer.sign(_task(), federation=FED)
    assert signed.signature is not None and len(signed.signature) == 64
    received = codec.decode(codec.encode(signed))
    assert isinstance(received, Task)
    _verifier_for(signer).verify(received, federation=FED)
    # informational, deliberately not covered
    _verifier_for(signer).verify(signed.model_copy(update={"created_at": 0.0}), federation=FED)


@pytest.mark.parametrize(
    "change",
    [
        {"train": TrainSpec(lr=5.0, local_steps=4)},
        {"method": "fwdgrad"},
        {"version": 4},
        {"model": ModelRef(name="other")},
        {"proxy": ProxySpec(dataset="synthetic", indices=(1, 5, 10), slice_id=3)},
        {"max_staleness": 1000},
    ],
)
def test_signing_tampered_task_is_refused(signer: GlobalSigner, change: dict[str, object]) -> None:
    signed = signer.sign(_task(), federation=FED)
    with pytest.raises(SignatureError, match="task version") as caught:
        _verifier_for(signer).verify(signed.model_copy(update=change), federation=FED)
    assert caught.value.problem == "bad_signature"
    assert caught.value.subject == "task"


def test_signing_task_unsigned_wrong_key_or_federation_is_refused(signer: GlobalSigner) -> None:
    verifier = _verifier_for(signer)
    with pytest.raises(SignatureError, match="no signature") as caught:
        verifier.verify(_task(), federation=FED)
    assert caught.value.problem == "unsigned"
    rogue = GlobalSigner(Ed25519PrivateKey.generate()).sign(_task(), federation=FED)
    with pytest.raises(SignatureError, match="no trusted key"):
        verifier.verify(rogue, federation=FED)
    with pytest.raises(SignatureError, match="bad_signature"):
        verifier.verify(signer.sign(_task(), federation=FED), federation="fed-b")


def test_signing_task_and_global_signatures_never_swap(signer: GlobalSigner) -> None:
    task = _task()
    assert task_digest(task, federation=FED) != task_digest(task, federation="fed-b")
    model = signer.sign(_global(), federation=FED)
    assert model.signature is not None
    forged = task.model_copy(update={"signature": model.signature})
    with pytest.raises(SignatureError, match="bad_signature"):
        _verifier_for(signer).verify(forged, federation=FED)


def test_signing_signed_by_leaves_messages_alone_without_a_key(signer: GlobalSigner) -> None:
    assert signed_by(None, _task(), federation=FED).signature is None
    assert signed_by(signer, _task(), federation=FED).signature is not None
