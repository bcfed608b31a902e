"""A site aggregator's settings, its connection to the root, and the root's sample cap."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import ValidationError

from aggregator.config import PRETRAINED_LORA_SERVER_LR, AggregatorConfig
from aggregator.connections import aggregator_client_id, upstream_transport
from aggregator.validation import ValidationPolicy, check_metadata
from edgefed.transport.config import BrokerList
from schemas.errors import ConfigError, UpdateRejected
from schemas.messages import ModelRef, Update
from tests.assets_helpers import require_minilm

UPSTREAM = "mqtt://127.0.0.1:1883"
SITE: dict[str, Any] = {
    "federation": "f",
    "role": "site",
    "upstream": {"url": UPSTREAM},
    "site_id": "site-a",
}


def site(**changes: Any) -> AggregatorConfig:
    return AggregatorConfig.model_validate(SITE | changes)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"upstream": {"url": UPSTREAM}},
        {"site_id": "site-a"},
        {"site_id": "site-a", "upstream": {}},  # an [upstream] table without a url
        {"site_id": "", "upstream": {"url": UPSTREAM}},
    ],
    ids=["neither", "no-site-id", "no-upstream", "upstream-without-url", "empty-site-id"],
)
def test_an_incomplete_site_is_refused_naming_site_id(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="site_id") as info:
        AggregatorConfig.model_validate({"federation": "f", "role": "site"} | fields)
    assert "[upstream]" in str(info.value)


@pytest.mark.parametrize(
    "changes",
    [
        {"method": "kd"},
        {"method": "split"},
        {"accept_methods": ("kd",)},
        {"sync": {"clients": ("a", "b")}},
    ],
    ids=["kd", "split", "accepts-kd", "sync"],
)
def test_a_site_merges_only_delta_updates_asynchronously(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="a site merges delta updates"):
        site(**changes)


def test_a_root_may_still_use_what_a_site_may_not() -> None:
    for changes in ({"method": "kd"}, {"method": "split"}, {"sync": {"clients": ("a", "b")}}):
        config = AggregatorConfig.model_validate({"federation": "f"} | changes)
        assert config.role == "root"


def test_a_complete_site_config_validates() -> None:
    config = site()
    assert (config.role, config.site_id) == ("site", "site-a")
    assert config.upstream is not None and config.upstream.url == UPSTREAM
    assert config.site_resend_s == 15.0
    assert site(method="fwdgrad").method == "fwdgrad"
    assert site(accept_methods=("fwdgrad",)).accept_methods == ("fwdgrad",)
    assert site(site_resend_s=0.5).site_resend_s == 0.5
    with pytest.raises(ValidationError, match="site_resend_s"):
        site(site_resend_s=0)
    root = AggregatorConfig(federation="f")
    assert (root.role, root.upstream, root.site_id, root.sites) == ("root", None, None, frozenset())


def test_a_site_of_a_pretrained_model_leaves_the_merge_step_to_the_root() -> None:
    require_minilm()
    model = ModelRef(name="minilm-l6")
    root = AggregatorConfig(federation="f", model=model)
    assert root.strategy.server_lr == PRETRAINED_LORA_SERVER_LR
    assert PRETRAINED_LORA_SERVER_LR != 1.0  # else the site's 1.0 would prove nothing
    assert site(model=model).strategy.server_lr == 1.0
    assert site(model=model, strategy={"server_lr": 0.5}).strategy.server_lr == 0.5


def test_the_upstream_connection_is_the_sites_persistent_session_at_the_root() -> None:
    config = site(max_payload=64 * 1024)
    settings = upstream_transport(config)
    assert settings.client_id == "site-a"
    assert settings.client_id != aggregator_client_id("f")
    assert settings.clean_session is False
    assert settings.brokers == BrokerList.of(UPSTREAM)
    assert str(settings.broker) == UPSTREAM
    assert settings.max_payload == 64 * 1024
    assert settings.max_message_bytes == config.max_message_bytes


def test_a_root_has_no_upstream_connection() -> None:
    with pytest.raises(ConfigError, match="site_id"):
        upstream_transport(AggregatorConfig(federation="f"))


def claim(client_id: str, num_samples: int) -> Update:
    return Update(
        client_id=client_id,
        task_id="task-1",
        base_version=3,
        num_samples=num_samples,
        delta={"w": torch.zeros(2)},
    )


def staleness(update: Update, policy: ValidationPolicy) -> int:
    return check_metadata(update, task_id="task-1", method="lora", current_version=4, policy=policy)


def test_a_site_may_claim_all_its_devices_samples_where_a_device_is_capped() -> None:
    policy = ValidationPolicy(max_samples=32, sites=frozenset({"site-a"}))
    assert staleness(claim("site-a", 500), policy) == 1
    assert staleness(claim("dev0", 32), policy) == 1
    with pytest.raises(UpdateRejected) as info:
        staleness(claim("dev0", 500), policy)
    assert info.value.reason == "too_many_samples"
    with pytest.raises(UpdateRejected) as capped:  # not a site of this policy
        staleness(claim("site-a", 500), ValidationPolicy(max_samples=32))
    assert capped.value.reason == "too_many_samples"


def test_a_site_is_exempt_from_the_cap_only() -> None:
    policy = ValidationPolicy(max_samples=32, sites=frozenset({"site-a"}), max_staleness=0)
    wrong_task = claim("site-a", 500).model_copy(update={"task_id": "task-2"})
    with pytest.raises(UpdateRejected) as info:
        staleness(wrong_task, policy)
    assert info.value.reason == "wrong_task"
    with pytest.raises(UpdateRejected) as stale:
        staleness(claim("site-a", 500), policy)
    assert stale.value.reason == "stale"
