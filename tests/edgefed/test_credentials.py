"""``edgefed credentials``: the files it makes, who may read them, and that secrets stay hidden."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aggregator.config import AggregatorConfig
from edge_agent.config import AgentConfig
from edgefed.cli.main import main
from edgefed.security.credentials import CredentialsDir, render_broker_config
from edgefed.security.signing import GlobalSigner, GlobalVerifier
from edgefed.settings import load_settings
from schemas.messages import GlobalModel

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd is not installed"
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _init(root: Path, *extra: str) -> CredentialsDir:
    args = ["credentials", "init", "--dir", str(root), "--broker-host", "broker.example"]
    assert main([*args, "--broker-host", "10.1.2.3", *extra]) == 0
    return CredentialsDir(root)


def test_credentials_init_and_add_device_keep_secrets_private(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = _init(tmp_path / "d")
    assert main(["credentials", "add-device", "--dir", str(layout.root), "pi-01"]) == 0
    printed = capsys.readouterr().out
    device = layout.identity("pi-01")
    password = (device / "password").read_text()
    assert password and password not in printed
    hashes = layout.password_file.read_text()
    assert password not in hashes
    assert {line.split(":")[0] for line in hashes.splitlines()} == {
        "aggregator",
        "aggregator-split",
        "pi-01",
    }
    assert all(line.split(":")[1].startswith("$7$") for line in hashes.splitlines())
    for secret in (
        layout.ca / "ca.key",
        layout.broker / "server.key",
        layout.password_file,
        device / "password",
        layout.identity("aggregator") / "global.key",
    ):
        assert _mode(secret) & 0o077 == 0, secret
    assert _mode(device) == 0o700

    agent = load_settings(
        AgentConfig, device / "connection.toml", federation="f", client_id="pi-01", data="x"
    )
    assert agent.mqtt.url == "mqtts://broker.example:8883"
    assert agent.mqtt.username == "pi-01"
    assert agent.mqtt.read_password() == password
    aggregator = load_settings(
        AggregatorConfig, layout.identity("aggregator") / "connection.toml", federation="f"
    )
    assert aggregator.signing_key is not None
    # The aggregator's key signs what the devices' copy of the public key verifies.
    model = GlobalModel(task_id="t", version=1, tensors={})
    signed = GlobalSigner.from_file(aggregator.signing_key).sign(model, federation="f")
    GlobalVerifier.from_files(agent.trusted_global_keys).verify(signed, federation="f")

    server = x509.load_pem_x509_certificate((layout.broker / "server.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["broker.example"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    ca = x509.load_pem_x509_certificate((layout.ca / "ca.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    conf = layout.broker_config.read_text()
    assert f"password_file {layout.password_file}" in conf
    assert f"acl_file {layout.broker / 'edgefed.acl'}" in conf
    assert "\nrequire_certificate" not in conf


def test_credentials_refuse_overwrites_and_the_aggregator_name(tmp_path: Path) -> None:
    layout = _init(tmp_path / "d")
    assert main(["credentials", "init", "--dir", str(layout.root), "--broker-host", "x"]) == 1
    assert main(["credentials", "add-device", "--dir", str(layout.root), "aggregator"]) == 1
    assert main(["credentials", "add-device", "--dir", str(layout.root), "bad/name"]) == 1
    assert main(["credentials", "add-device", "--dir", str(layout.root), "pi-01"]) == 0
    first = (layout.identity("pi-01") / "password").read_text()
    assert main(["credentials", "add-device", "--dir", str(layout.root), "pi-01"]) == 1
    args = ["credentials", "add-device", "--dir", str(layout.root), "pi-01", "--rotate"]
    assert main(args) == 0
    assert (layout.identity("pi-01") / "password").read_text() != first
    assert main(["credentials", "revoke", "--dir", str(layout.root), "pi-01"]) == 0
    assert "pi-01" not in layout.password_file.read_text()
    assert not layout.identity("pi-01").exists()
    assert main(["credentials", "revoke", "--dir", str(layout.root), "pi-01"]) == 1


def test_credentials_client_certificates_and_their_revocation(tmp_path: Path) -> None:
    layout = _init(tmp_path / "d", "--client-certs")
    conf = layout.broker_config.read_text()
    for line in ("require_certificate true", "use_identity_as_username true", "crlfile "):
        assert f"\n{line}" in conf
    assert main(["credentials", "add-device", "--dir", str(layout.root), "pi-02"]) == 0
    cert = x509.load_pem_x509_certificate((layout.identity("pi-02") / "client.crt").read_bytes())
    common_name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert common_name == "pi-02"  # the user name the ACL sees
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert main(["credentials", "revoke", "--dir", str(layout.root), "pi-02"]) == 0
    crl = x509.load_pem_x509_crl((layout.broker / "ca.crl").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


def test_credentials_render_moves_paths_and_port() -> None:
    template = Path("broker_config/production.conf").read_text()
    text = render_broker_config(template, Path("/srv/b"), client_certs=False, port=9999)
    assert "listener 9999\n" in text
    assert "cafile /srv/b/ca.crt\n" in text
    assert "#crlfile /etc/mosquitto/edgefed/broker/ca.crl" in text  # off without client certs


def test_credentials_init_writes_absolute_paths_and_its_own_broker_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative ``--dir`` still gives configs that work from anywhere, and the broker never
    shares the packaged Mosquitto's ``/var/lib/mosquitto`` database."""
    monkeypatch.chdir(tmp_path)
    layout = _init(Path("deploy"))
    assert layout.root == tmp_path / "deploy"
    config = layout.broker_config.read_text()
    assert f"persistence_location {layout.persistence}/\n" in config
    assert layout.persistence.is_dir()
    assert "/var/lib/mosquitto" not in config
    assert f"cafile {layout.broker / 'ca.crt'}\n" in config
    connection = (layout.identity("aggregator") / "connection.toml").read_text()
    assert str(tmp_path / "deploy") in connection and '"deploy/' not in connection
