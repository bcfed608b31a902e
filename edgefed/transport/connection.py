"""How agents and the aggregator reach a secured broker, as read from their TOML config.

The ``[mqtt]`` table of ``agent.toml`` or ``aggregator.toml`` (``edgefed credentials`` writes
one per identity as ``connection.toml``) names the broker URL, the CA, an optional client
certificate, the user name and a *file* holding the password. Secrets therefore live in
files readable by their owner, or in ``EDGEFED_MQTT_PASSWORD``, never on a command line
where shell history and the process list would keep them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from edgefed.settings import Settings
from edgefed.transport.config import PASSWORD_ENV, BrokerAddress, BrokerList, TransportConfig
from schemas.errors import ConfigError


def refuse_password_in_url(url: BrokerAddress | None, *, where: str) -> None:
    """Refuse a broker URL that carries a password, where it would leak (argv, config dumps).

    Raises:
        ConfigError: ``url`` has a password.
    """
    if url is not None and any(u.password is not None for u in BrokerList.of(url).urls):
        raise ConfigError(
            f"the broker URL in {where} carries a password, which would be kept in shell "
            f"history and shown in the process list; put it in the password_file named in "
            f"the [mqtt] config table or in {PASSWORD_ENV}"
        )


class MqttSettings(Settings):
    """The ``[mqtt]`` table: broker address, TLS files and identity.

    Attributes:
        url: broker URL used when the command line gives none (``mqtts://host:8883``); a
            clustered broker's nodes as a list (or separated by commas), tried in turn.
        ca_file: CA certificate that signed the broker's certificate.
        cert_file: client certificate, where the broker authenticates by certificate.
        key_file: the client certificate's key.
        username: MQTT user name (a device's is its client id); else ``EDGEFED_MQTT_USERNAME``.
        password_file: file whose first line is the password; else ``EDGEFED_MQTT_PASSWORD``.
        connect_timeout_s: how long the first connection may take; None keeps trying (with
            backoff, each failure logged with the URL) until the broker answers, as a
            service that outlives a broker restart must.
    """

    url: str | list[str] | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password_file: str | None = None
    connect_timeout_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _checked(self) -> MqttSettings:
        if self.url is not None:
            refuse_password_in_url(BrokerList.of(self.url), where="the [mqtt] config table")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file")
        return self

    def broker_url(self, command_line: BrokerAddress | None) -> BrokerAddress | None:
        """The URL to dial: the command line's (never with a password), else the config's.

        Raises:
            ConfigError: the command-line URL carries a password.
        """
        refuse_password_in_url(command_line, where="--broker")
        if command_line is not None:
            return command_line
        return BrokerList.of(self.url) if self.url is not None else None

    def read_password(self) -> str | None:
        """The password from ``password_file`` (first line), or None to fall back on the env.

        Raises:
            ConfigError: the file cannot be read or is empty.
        """
        if self.password_file is None:
            return None
        try:
            text = Path(self.password_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read the MQTT password file: {exc}") from exc
        password = text.splitlines()[0] if text else ""
        if not password:
            raise ConfigError(f"the MQTT password file {self.password_file} is empty")
        return password

    def transport_config(
        self, *, url: BrokerAddress, client_id: str, **options: Any
    ) -> TransportConfig:
        """A :class:`TransportConfig` for ``url`` with these TLS files and this identity.

        Raises:
            ConfigError: a setting cannot work (see :class:`TransportConfig`).
        """
        wait = math.inf if self.connect_timeout_s is None else self.connect_timeout_s
        return TransportConfig(
            url=url,
            client_id=client_id,
            connect_timeout_s=options.pop("connect_timeout_s", wait),
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
            username=self.username,
            password=self.read_password(),
            **options,
        )
