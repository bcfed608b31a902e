"""Split-learning messages validate when built: each phase carries exactly its tensors."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from schemas import codec, topics
from schemas.messages import SplitReply, SplitRequest

HIDDEN = torch.zeros(1, 2, 4)
LABELS = torch.zeros(1, 2, dtype=torch.int64)


def _request(**changes: object) -> SplitRequest:
    fields: dict[str, object] = {
        "step_id": "s",
        "client_id": "dev",
        "task_id": "t",
        "cut": 1,
        "tensors": {"hidden": HIDDEN, "labels": LABELS},
    }
    return SplitRequest.model_validate(fields | changes)


def test_split_request_phases_need_their_tensors() -> None:
    assert _request().phase == "forward"
    assert _request(variant="u_shaped", tensors={"hidden": HIDDEN}).variant == "u_shaped"
    with pytest.raises(ValidationError, match="labels"):
        _request(tensors={"hidden": HIDDEN})  # vanilla sends its labels
    with pytest.raises(ValidationError, match="only the u_shaped"):
        _request(phase="backward", tensors={"grad": HIDDEN})
    with pytest.raises(ValidationError, match="carries tensors"):
        _request(variant="u_shaped", tensors={"hidden": HIDDEN, "labels": LABELS})
    with pytest.raises(ValidationError):
        _request(cut=0)


def test_split_reply_rejection_needs_reason_and_acceptance_tensors() -> None:
    with pytest.raises(ValidationError, match="reason"):
        SplitReply(request_id="r", client_id="dev", accepted=False)
    with pytest.raises(ValidationError, match="gradient or hidden"):
        SplitReply(request_id="r", client_id="dev", accepted=True)


def test_split_activations_travel_fp16_or_int8() -> None:
    hidden = torch.linspace(-2, 2, 2 * 8 * 16).reshape(2, 8, 16)
    request = _request(tensors={"hidden": hidden, "labels": torch.zeros(2, 8, dtype=torch.int64)})
    plain = len(codec.encode(request))
    for compression, tolerance in (("fp16", 1e-3), ("int8", 2e-2)):
        data = codec.encode(request, compression=compression)
        assert len(data) < plain
        back = codec.decode(data)
        assert isinstance(back, SplitRequest)
        assert back.tensors["labels"].dtype == torch.int64
        torch.testing.assert_close(back.tensors["hidden"].float(), hidden, atol=tolerance, rtol=0)


def test_split_topics_parse_back() -> None:
    assert topics.split_fwd_filter("fed") == "edgefed/fed/split/+/fwd"
    parsed = topics.parse(topics.split_fwd("fed", "dev-1"))
    assert (parsed.kind, parsed.client_id) == ("split_fwd", "dev-1")
    assert topics.parse(topics.split_bwd("fed", "dev-1")).kind == "split_bwd"
