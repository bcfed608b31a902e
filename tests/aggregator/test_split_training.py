"""The split server without a broker: batching keeps answers, merges keep both halves."""

from __future__ import annotations

import pytest
import torch

from aggregator.split_training import SplitFed, SplitServer, SplitServerConfig
from aggregator.strategies import make_strategy
from edgefed.ml.models import attach_lora, build_model, get_adapter
from edgefed.ml.split_model import part_names
from schemas.messages import LoraSpec, SplitRequest, TensorMap

LORA = LoraSpec(rank=4)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _server(**config: object) -> SplitServer:
    model = attach_lora(build_model("tiny-4l"), LORA)
    return SplitServer(model, task_id="t", config=SplitServerConfig(**config))  # type: ignore[arg-type]


def _requests(n: int) -> list[SplitRequest]:
    gen = torch.Generator().manual_seed(5)
    return [
        SplitRequest(
            step_id=f"s{i}",
            client_id=f"dev{i}",
            task_id="t",
            cut=2,
            tensors={
                "hidden": torch.randn(3, 10, 64, generator=gen),
                "labels": torch.randint(0, 64, (3, 10), generator=gen),
            },
        )
        for i in range(n)
    ]


def test_batched_requests_get_the_same_answers_as_one_by_one():
    requests = _requests(3)
    batched, single = _server(lr=1e-9), _server(lr=1e-9, batch=False)
    together = batched.serve(requests)
    apart = single.serve(requests)
    assert (batched.batches, single.batches) == (1, 3)
    for a, b in zip(together, apart, strict=True):
        assert a.accepted and b.accepted and a.request_id == b.request_id
        assert a.loss == pytest.approx(b.loss, abs=1e-6)
        torch.testing.assert_close(a.tensors["grad"], b.tensors["grad"], atol=1e-5, rtol=0)
    again = batched.serve(requests[:1])  # a retry: the same answer, no second step
    assert again[0] is together[0] and batched.served == 3


def test_splitfed_merges_the_device_part_and_adds_the_server_progress():
    server = _server(lr=5e-2)
    current = get_adapter(server.model)
    device = set(part_names(server.model, 0, 2))
    delta: TensorMap = {
        n: torch.full_like(t, 0.1) if n in device else torch.zeros_like(t)
        for n, t in current.items()
    }
    server.serve(_requests(2))  # the server part trains on its own meanwhile
    trained = get_adapter(server.model)
    moved = {n for n in current if not torch.equal(trained[n], current[n])}
    assert moved and not moved & device
    strategy = SplitFed(make_strategy("fedasync", alpha=0.5), server)
    result = strategy.submit(
        current=current, base=current, delta=delta, staleness=0, num_samples=8, update_id="u1"
    )
    assert result.new_global is not None
    for name, tensor in result.new_global.items():
        if name in device:  # FedAsync mixed in half of the device's step
            torch.testing.assert_close(tensor, current[name] + 0.05)
        else:  # zeros mean "not trained here": the server's own values, not the base's
            torch.testing.assert_close(tensor, trained[name])
    after = get_adapter(server.model)  # the server continues from the merged global
    for name, tensor in result.new_global.items():
        torch.testing.assert_close(after[name], tensor)


def test_named_choices_make_the_server_score_the_answer_among_them_only():
    request = _requests(1)[0]
    labels = torch.full((3, 10), -100)
    labels[:, -1] = torch.tensor([7, 9, 7])
    plain = request.model_copy(update={"tensors": request.tensors | {"labels": labels}})
    among = plain.model_copy(update={"choices": (7, 9), "request_id": "r-choices"})
    vocabulary, choices = _server(lr=1e-9).serve([plain])[0], _server(lr=1e-9).serve([among])[0]
    assert vocabulary.accepted and choices.accepted
    # Two candidates against 64: about log 2 against about log 64 for an untrained model.
    assert choices.loss is not None and vocabulary.loss is not None
    assert choices.loss < 0.5 * vocabulary.loss and vocabulary.loss > 3.0


@pytest.mark.parametrize("choices", [(7,), (7, 9, 64)])
def test_choices_that_miss_a_label_or_leave_the_vocabulary_are_refused(choices):
    request = _requests(1)[0]
    labels = torch.full((3, 10), -100)
    labels[:, -1] = torch.tensor([7, 9, 7])
    bad = request.model_copy(
        update={"tensors": request.tensors | {"labels": labels}, "choices": choices}
    )
    reply = _server().serve([bad])[0]
    assert not reply.accepted and reply.reason == "malformed" and "choices" in reply.detail
