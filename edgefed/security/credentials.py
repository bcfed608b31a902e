"""``edgefed credentials``: the CA, the broker's certificate, per-identity secrets, signing keys.

One folder holds a deployment's security material, laid out by who may read what::

    <dir>/ca/          ca.key (owner only), ca.crt, revoked.json       -- stays on the admin host
    <dir>/broker/      mosquitto.conf, ca.crt, server.crt/.key, passwd, edgefed.acl [, ca.crl],
                       data/ (the broker's own database)
    <dir>/signing/     global.key (owner only), global.pub [, previous.pub] -- the signing key
    <dir>/aggregator/  password, ca.crt, global.key, connection.toml    -- for the aggregator host
    <dir>/devices/ID/  password, ca.crt, global.pub, [client.crt/.key], connection.toml

Each identity's folder is what is copied to that machine; its ``connection.toml`` is a
config fragment (``--config``) naming the broker URL, CA, user name, the password *file*
and the trusted signing key, so no secret is ever typed on a command line. Passwords are
random, written to files readable by their owner only, and handed to ``mosquitto_passwd``
on its standard input (never in its arguments, which other users can read). They are never
printed or logged.

Certificates are ECDSA P-256 made with the ``cryptography`` package; revocation of client
certificates goes through a CRL the broker reads. How to rotate and revoke is in
``broker_config/README.md``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefed.security.signing import write_keypair
from edgefed.transport.broker import CONFIG_DIR
from schemas.errors import ConfigError, TopicError
from schemas.topics import check_name

log = logging.getLogger(__name__)

PRODUCTION_CONFIG: Final = CONFIG_DIR / "production.conf"
ACL_FILE: Final = CONFIG_DIR / "edgefed.acl"
AGGREGATOR: Final = "aggregator"
"""The aggregator's identity; broker_config/edgefed.acl gives this user name its rights."""
SPLIT_SERVER: Final = "aggregator-split"
"""The split server's identity, beside the aggregator on its host: a broker that makes the
user name the client id would take a second ``aggregator`` login for the first one's
replacement and close it. Its login lives in the aggregator's folder (``split.*``)."""
DEFAULT_PORT: Final = 8883
_PATH_KEYS: Final = ("cafile", "certfile", "keyfile", "crlfile", "password_file", "acl_file")
_CERT_MODE_KEYS: Final = ("require_certificate", "use_identity_as_username", "crlfile")
_CA_DAYS: Final = 3650


@dataclass(frozen=True)
class CredentialsDir:
    """Where each part of a deployment's security material lives (see the module docstring).

    ``root`` is made absolute, so the configs written from it work from any directory.
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).absolute())

    @property
    def ca(self) -> Path:
        """The CA's private folder."""
        return self.root / "ca"

    @property
    def broker(self) -> Path:
        """What the broker reads."""
        return self.root / "broker"

    @property
    def signing(self) -> Path:
        """The global-model signing key pair."""
        return self.root / "signing"

    @property
    def persistence(self) -> Path:
        """The broker's own database folder, never the packaged Mosquitto's."""
        return self.broker / "data"

    @property
    def broker_config(self) -> Path:
        """The Mosquitto configuration written by :func:`init_credentials`."""
        return self.broker / "mosquitto.conf"

    @property
    def password_file(self) -> Path:
        """Mosquitto's password file (hashes only)."""
        return self.broker / "passwd"

    @property
    def public_key(self) -> Path:
        """The public half of the signing key, which every agent trusts."""
        return self.signing / "global.pub"

    @property
    def previous_public_key(self) -> Path:
        """The retired signing key agents still trust while a rotation is under way."""
        return self.signing / "previous.pub"

    def identity(self, name: str) -> Path:
        """The folder copied to the machine that runs as ``name``."""
        return self.root / AGGREGATOR if name == AGGREGATOR else self.root / "devices" / name

    def _settings(self) -> dict[str, object]:
        path = self.root / "settings.json"
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.root} is not an edgefed credentials folder: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} is not a JSON object")
        return loaded


# --------------------------------------------------------------------------- files


def _write_secret(path: Path, data: bytes) -> None:
    """Write ``data`` readable by its owner only, from the first byte on."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _give_to_broker_user(folder: Path, user: str | None) -> None:
    """Hand the broker's folder to the user Mosquitto drops privileges to, when run as root.

    Mosquitto started as root reads its password file, ACL and TLS key after switching to
    its own user, so those must belong to that user; as any other user it reads them as
    itself and nothing needs to change.
    """
    if user is None or os.geteuid() != 0:
        return
    try:
        import pwd  # noqa: PLC0415 (POSIX only, and only needed as root)

        entry = pwd.getpwnam(user)
    except (ImportError, KeyError):
        return  # no such user: mosquitto then keeps running as root
    for path in (folder, *folder.iterdir()):
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# --------------------------------------------------------------------------- certificates


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefed"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _load_ca(layout: CredentialsDir) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key((layout.ca / "ca.key").read_bytes(), None)
        cert = x509.load_pem_x509_certificate((layout.ca / "ca.crt").read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the CA in {layout.ca}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{layout.ca / 'ca.key'} is not an EC key")
    return key, cert


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    common_name: str,
    days: int,
    server_names: Sequence[str] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A key and a certificate signed by the CA: for a server when ``server_names`` is given."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server_names:
        alt: list[x509.GeneralName] = []
        for host in server_names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alt.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        usage = ExtendedKeyUsageOID.SERVER_AUTH
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH
    builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _new_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _write_crl(layout: CredentialsDir) -> None:
    """Re-sign the CRL from ``ca/revoked.json``; the broker refuses the serials listed."""
    ca_key, ca_cert = _load_ca(layout)
    revoked_path = layout.ca / "revoked.json"
    serials: list[int] = (
        json.loads(revoked_path.read_text(encoding="utf-8")) if revoked_path.exists() else []
    )
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=_CA_DAYS))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - dt.timedelta(minutes=5))
            .build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    (layout.broker / "ca.crl").write_bytes(crl.public_bytes(serialization.Encoding.PEM))


def _revoke_certificate(layout: CredentialsDir, cert_path: Path) -> None:
    if not cert_path.exists():
        return
    serial = x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number
    revoked_path = layout.ca / "revoked.json"
    serials: list[int] = (
        json.loads(revoked_path.read_text(encoding="utf-8")) if revoked_path.exists() else []
    )
    if serial not in serials:
        serials.append(serial)
    revoked_path.write_text(json.dumps(serials), encoding="utf-8")
    _write_crl(layout)


# --------------------------------------------------------------------------- broker config


def render_broker_config(
    template: str, broker_dir: Path, *, client_certs: bool, port: int = DEFAULT_PORT
) -> str:
    """``production.conf`` with its file paths and database folder moved into ``broker_dir``.

    With ``client_certs`` the certificate-identity lines are switched on (see the comments in
    production.conf); the listener moves to ``port``.
    """
    out: list[str] = []
    for original in template.splitlines():
        line = original
        words = line.split()
        keyword = words[0] if words else ""
        if client_certs and keyword.startswith("#") and keyword[1:] in _CERT_MODE_KEYS:
            words[0] = keyword = keyword[1:]
            line = " ".join(words)
        if keyword in _PATH_KEYS and len(words) == 2:
            line = f"{keyword} {broker_dir / Path(words[1]).name}"
        elif keyword == "persistence_location":  # its own, not /var/lib/mosquitto's database
            line = f"{keyword} {broker_dir / 'data'}/"
        elif keyword == "listener":
            line = f"listener {port}" + (f" {words[2]}" if len(words) > 2 else "")
        out.append(line)
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- identities


def _mosquitto_passwd() -> str:
    found = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not os.access(found, os.X_OK):
        raise ConfigError("mosquitto_passwd is not installed (it comes with mosquitto)")
    return found


def _set_password(layout: CredentialsDir, name: str, password: str) -> None:
    """Add or replace ``name``'s hash in the password file; the password goes in on stdin."""
    secret_line = f"{password}\n".encode()
    result = subprocess.run(
        [_mosquitto_passwd(), str(layout.password_file), name],
        input=secret_line * 2,  # the tool asks twice
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        raise ConfigError(
            f"mosquitto_passwd could not set {name!r}: {result.stderr.decode(errors='replace')}"
        )


def _delete_password(layout: CredentialsDir, name: str) -> None:
    result = subprocess.run(
        [_mosquitto_passwd(), "-D", str(layout.password_file), name],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        raise ConfigError(
            f"mosquitto_passwd could not delete {name!r}: {result.stderr.decode(errors='replace')}"
        )


def _check_identity(name: str, *, device: bool) -> str:
    try:
        check_name(name, "identity")
    except TopicError as exc:
        raise ConfigError(str(exc)) from exc
    if device and name in (AGGREGATOR, SPLIT_SERVER):
        raise ConfigError(f"{name!r} is the aggregator's identity; a device needs another")
    return name


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _write_identity(
    layout: CredentialsDir, name: str, *, client_cert: bool, days: int, broker_user: str | None
) -> Path:
    folder = layout.identity(name)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    shutil.copyfile(layout.ca / "ca.crt", folder / "ca.crt")
    lines = [
        "# edgefed connection settings for this identity; secrets stay in the files named here.",
        "[mqtt]",
        *_login(layout, name, folder, prefix="", client_cert=client_cert, days=days),
    ]
    if name == AGGREGATOR:
        shutil.copyfile(layout.signing / "global.key", folder / "global.key")
        (folder / "global.key").chmod(0o600)
        lines.insert(1, f"signing_key = {_toml_str(str(folder / 'global.key'))}")
        lines += [
            "",
            "# The split server's own login (it connects beside the aggregator).",
            "[split_mqtt]",
        ]
        lines += _login(
            layout, SPLIT_SERVER, folder, prefix="split.", client_cert=client_cert, days=days
        )
    else:
        lines.insert(1, trusted_keys_line(layout, folder))
    (folder / "connection.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _give_to_broker_user(layout.broker, broker_user)
    return folder


def _login(
    layout: CredentialsDir, name: str, folder: Path, *, prefix: str, client_cert: bool, days: int
) -> list[str]:
    """A fresh password (and certificate) for ``name`` in ``folder``; its ``[mqtt]`` lines."""
    password = secrets.token_urlsafe(24)
    _write_secret(folder / f"{prefix}password", password.encode())
    lines = [
        f"url = {_toml_str(str(layout._settings()['url']))}",
        f"ca_file = {_toml_str(str(folder / 'ca.crt'))}",
        f"username = {_toml_str(name)}",
        f"password_file = {_toml_str(str(folder / f'{prefix}password'))}",
    ]
    if client_cert:
        cert_path, key_path = folder / f"{prefix}client.crt", folder / f"{prefix}client.key"
        _revoke_certificate(layout, cert_path)  # a rotated certificate stops working
        ca_key, ca_cert = _load_ca(layout)
        key, cert = _issue(ca_key, ca_cert, common_name=name, days=days)
        _write_secret(key_path, _pem_key(key))
        cert_path.write_bytes(_pem_cert(cert))
        lines += [
            f"cert_file = {_toml_str(str(cert_path))}",
            f"key_file = {_toml_str(str(key_path))}",
        ]
    _set_password(layout, name, password)
    return lines


def trusted_keys_line(layout: CredentialsDir, folder: Path) -> str:
    """Copy the public keys agents trust now into ``folder``; the config line naming them."""
    trusted = [layout.public_key, layout.previous_public_key]
    copies = [folder / key.name for key in trusted if key.exists()]
    for copy in copies:
        shutil.copyfile(layout.signing / copy.name, copy)
    return f"trusted_global_keys = [{', '.join(_toml_str(str(c)) for c in copies)}]"


def init_credentials(
    root: str | os.PathLike[str],
    *,
    broker_hosts: Sequence[str],
    port: int = DEFAULT_PORT,
    client_certs: bool = False,
    days: int = 365,
    broker_user: str | None = "mosquitto",
) -> CredentialsDir:
    """Create a deployment's CA, broker certificate and config, signing key and aggregator login.

    Args:
        root: Folder to create (it may exist only if empty).
        broker_hosts: Names and addresses devices dial; all go into the broker certificate.
        port: The TLS listener's port.
        client_certs: Authenticate by client certificate (CN = identity) instead of password.
        days: Validity of the broker's and clients' certificates.
        broker_user: The user Mosquitto runs as, given the broker's files when run as root.

    Raises:
        ConfigError: ``root`` is not empty, no host is given, or a tool is missing.
    """
    layout = CredentialsDir(Path(root))
    if not broker_hosts:
        raise ConfigError("name at least one broker host (DNS name or IP address)")
    if layout.root.exists() and any(layout.root.iterdir()):
        raise ConfigError(f"{layout.root} is not empty; credentials are never overwritten")
    _mosquitto_passwd()
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.root.chmod(0o711)  # the broker's user must reach broker/, nothing more
    folders = [(layout.ca, 0o700), (layout.signing, 0o700), (layout.broker, 0o750)]
    for folder, mode in [*folders, (layout.persistence, 0o750)]:
        folder.mkdir()
        folder.chmod(mode)
    host = broker_hosts[0]
    url_host = f"[{host}]" if ":" in host else host
    settings = {"url": f"mqtts://{url_host}:{port}", "client_certs": client_certs}
    (layout.root / "settings.json").write_text(json.dumps(settings), encoding="utf-8")

    ca_key, ca_cert = _new_ca("edgefed CA")
    _write_secret(layout.ca / "ca.key", _pem_key(ca_key))
    (layout.ca / "ca.crt").write_bytes(_pem_cert(ca_cert))
    server_key, server_cert = _issue(
        ca_key, ca_cert, common_name=host, days=days, server_names=broker_hosts
    )
    _write_secret(layout.broker / "server.key", _pem_key(server_key))
    (layout.broker / "server.crt").write_bytes(_pem_cert(server_cert))
    shutil.copyfile(layout.ca / "ca.crt", layout.broker / "ca.crt")
    shutil.copyfile(ACL_FILE, layout.broker / "edgefed.acl")
    _write_secret(layout.password_file, b"")
    if client_certs:
        _write_crl(layout)
    template = PRODUCTION_CONFIG.read_text(encoding="utf-8")
    config = render_broker_config(template, layout.broker, client_certs=client_certs, port=port)
    layout.broker_config.write_text(config, encoding="utf-8")
    write_keypair(layout.signing / "global.key", layout.public_key)
    _write_identity(
        layout, AGGREGATOR, client_cert=client_certs, days=days, broker_user=broker_user
    )
    return layout


def add_device(
    root: str | os.PathLike[str],
    name: str,
    *,
    client_cert: bool | None = None,
    rotate: bool = False,
    days: int = 365,
    broker_user: str | None = "mosquitto",
) -> Path:
    """Give device ``name`` a fresh password (and client certificate); returns its folder.

    Args:
        root: The folder made by :func:`init_credentials`.
        name: The device's client id, which is also its MQTT user name.
        client_cert: Issue a client certificate; None follows the deployment's setting.
        rotate: Replace existing credentials (the old password and certificate stop working).
        days: Validity of the client certificate.
        broker_user: See :func:`init_credentials`.

    Raises:
        ConfigError: The name is invalid or taken (without ``rotate``).
    """
    layout = CredentialsDir(Path(root))
    _check_identity(name, device=True)
    folder = layout.identity(name)
    if folder.exists() and not rotate:
        raise ConfigError(f"device {name!r} already has credentials; use --rotate to replace")
    if client_cert is None:
        client_cert = bool(layout._settings().get("client_certs", False))
    return _write_identity(
        layout, name, client_cert=client_cert, days=days, broker_user=broker_user
    )


def rotate_aggregator(
    root: str | os.PathLike[str], *, days: int = 365, broker_user: str | None = "mosquitto"
) -> Path:
    """Give the aggregator identity a fresh password (and certificate); returns its folder."""
    layout = CredentialsDir(Path(root))
    client_cert = bool(layout._settings().get("client_certs", False))
    return _write_identity(
        layout, AGGREGATOR, client_cert=client_cert, days=days, broker_user=broker_user
    )


def revoke_device(
    root: str | os.PathLike[str], name: str, *, broker_user: str | None = "mosquitto"
) -> None:
    """Remove device ``name``: its password entry, its certificate (via the CRL), its folder.

    The broker applies a new password file on reload (SIGHUP) and a new CRL on restart; a
    connection already open stays open until then (broker_config/README.md).

    Raises:
        ConfigError: The device has no credentials here.
    """
    layout = CredentialsDir(Path(root))
    _check_identity(name, device=True)
    folder = layout.identity(name)
    if not folder.exists():
        raise ConfigError(f"device {name!r} has no credentials in {layout.root}")
    _delete_password(layout, name)
    _revoke_certificate(layout, folder / "client.crt")
    shutil.rmtree(folder)
    _give_to_broker_user(layout.broker, broker_user)
