"""Broker URLs, credentials and transport settings: parsed and checked before any I/O."""

from __future__ import annotations

import pytest

from edgefed.transport.config import BrokerList, BrokerURL, TransportConfig, resolve_credentials
from schemas.errors import ConfigError


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker.local:1884", BrokerURL("mqtt", "broker.local", 1884)),
        ("mqtts://broker.local", BrokerURL("mqtts", "broker.local", 8883)),
        ("mqtt://broker.local", BrokerURL("mqtt", "broker.local", 1883)),
        ("broker.local:2883", BrokerURL("mqtt", "broker.local", 2883)),
        ("127.0.0.1", BrokerURL("mqtt", "127.0.0.1", 1883)),
        ("[::1]:1999", BrokerURL("mqtt", "::1", 1999)),
        ("MQTTS://Broker.Local:9/", BrokerURL("mqtts", "broker.local", 9)),
        ("mqtt://ann:s%40cret@h:1", BrokerURL("mqtt", "h", 1, "ann", "s@cret")),
        ("mqtt://ann@h", BrokerURL("mqtt", "h", 1883, "ann", None)),
    ],
)
def test_broker_url_parse_accepts(url: str, expected: BrokerURL) -> None:
    parsed = BrokerURL.parse(url)
    assert parsed == expected
    assert parsed.password == expected.password


@pytest.mark.parametrize(
    "url",
    [
        "",
        "http://h:1883",
        "mqtt://",
        "mqtt://:1883",
        "mqtt://h:0",
        "mqtt://h:70000",
        "h:port",
        "mqtt://h/some/path",
        "mqtt://h?x=1",
        "mqtt://h#frag",
    ],
)
def test_broker_url_parse_rejects(url: str) -> None:
    with pytest.raises(ConfigError):
        BrokerURL.parse(url)


def test_broker_url_hides_password() -> None:
    url = BrokerURL.parse("mqtts://ann:hunter2@[::1]:8884")
    assert "hunter2" not in repr(url)
    assert str(url) == "mqtts://[::1]:8884"
    assert url.tls


def test_resolve_credentials_config_then_url_then_env() -> None:
    env = {"EDGEFED_MQTT_USERNAME": "env-user", "EDGEFED_MQTT_PASSWORD": "env-pass"}
    bare = TransportConfig(url="mqtt://h", client_id="c")
    assert resolve_credentials(bare, environ=env) == ("env-user", "env-pass")
    assert resolve_credentials(bare, environ={}) == (None, None)
    in_url = TransportConfig(url="mqtt://url-user:url-pass@h", client_id="c")
    assert resolve_credentials(in_url, environ=env) == ("url-user", "url-pass")
    user_only = TransportConfig(url="mqtt://url-user@h", client_id="c")
    assert resolve_credentials(user_only, environ=env) == ("url-user", "env-pass")
    overridden = TransportConfig(
        url="mqtt://url-user:url-pass@h", client_id="c", username="cfg", password="cfg-pass"
    )
    assert resolve_credentials(overridden, environ=env) == ("cfg", "cfg-pass")
    with pytest.raises(ConfigError, match="user name"):
        resolve_credentials(TransportConfig(url="mqtt://h", client_id="c", password="p"))


@pytest.mark.parametrize(
    "overrides",
    [
        {"url": "ftp://h"},
        {"client_id": ""},
        {"max_payload": 100},
        {"max_message_bytes": 0},
        {"reconnect_min_s": 5.0, "reconnect_max_s": 1.0},
        {"publish_window": 0},
        {"key_file": "client.key"},
        {"url": "mqtt://a,mqtts://b"},
        {"url": "mqtt://a,mqtt://a:1883"},
        {"url": " , "},
    ],
)
def test_transport_config_rejects_settings_that_cannot_work(overrides: dict[str, object]) -> None:
    settings: dict[str, object] = {"url": "mqtt://h", "client_id": "c"} | overrides
    with pytest.raises(ConfigError):
        TransportConfig(**settings)  # type: ignore[arg-type]


def test_transport_config_password_not_in_repr() -> None:
    assert "hunter2" not in repr(TransportConfig(url="h", client_id="c", password="hunter2"))


def test_broker_list_keeps_the_order_the_nodes_are_tried_in() -> None:
    nodes = BrokerList.parse("mqtt://n1:1884, n2:1885 ,mqtt://n3")
    assert [str(url) for url in nodes.urls] == [
        "mqtt://n1:1884",
        "mqtt://n2:1885",
        "mqtt://n3:1883",
    ]
    assert BrokerList.of(str(nodes)) == nodes == BrokerList.of([str(u) for u in nodes.urls])
    assert TransportConfig(url=nodes, client_id="c").broker == nodes.first
    assert BrokerList.of(nodes.first).urls == (nodes.first,)
