"""Where an agent's fits run: the GPU for LoRA and KD when there is one, else the CPU."""

from __future__ import annotations

import math

import pytest
import torch

from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from edge_agent.device import fit_device, resolve_device
from edge_agent.task_model import task_model
from edge_agent.trainers import KdTrainer, make_trainer
from edgefed.data.synthetic import synthetic_dataset
from edgefed.ml.models import get_adapter
from edgefed.transport.memory import MemoryBroker
from schemas.errors import ConfigError
from schemas.messages import ModelRef, ProxySpec, Task, TrainSpec

HAS_CUDA = torch.cuda.is_available()
SPEC = TrainSpec(local_steps=4, batch_size=8, seq_len=16, lr=1e-2)


def test_auto_takes_the_gpu_only_where_torch_sees_one() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if HAS_CUDA else "cpu")


def test_lora_and_kd_train_on_the_gpu_and_the_other_methods_on_the_cpu() -> None:
    assert [fit_device("cuda", m) for m in ("lora", "kd", "fwdgrad", "split")] == [
        "cuda",
        "cuda",
        "cpu",
        "cpu",
    ]
    assert {fit_device("cpu", m) for m in ("lora", "kd", "fwdgrad", "split")} == {"cpu"}


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine whose torch sees no GPU")
async def test_an_agent_told_to_use_a_gpu_it_lacks_stops_at_start_saying_so() -> None:
    config = AgentConfig(federation="f", client_id="d", data="synthetic:n=8", device="cuda")
    async with MemoryBroker().transport("d") as transport:
        with pytest.raises(ConfigError, match=r"device = 'cuda'.*no CUDA device"):
            EdgeAgent(config, transport)
    assert AgentConfig(federation="f", client_id="d", data="synthetic:n=8").device == "auto"


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU torch can use")
@pytest.mark.parametrize("method", ["lora", "kd"])
def test_a_fit_on_the_gpu_learns_and_answers_in_cpu_tensors(method: str) -> None:
    task = Task(task_id="t", federation="f", version=0, model=ModelRef(name="tiny"), train=SPEC)
    model = task_model(task, device="cuda")
    assert all(p.device.type == "cuda" for p in model.parameters())
    trainer = make_trainer(method, model)
    if isinstance(trainer, KdTrainer):
        proxy = ProxySpec(dataset="synthetic:n=64,seed=4242", indices=(3, 9), slice_id=0)
        trainer.use_proxy(proxy, seq_len=SPEC.seq_len, model=task.model)
    data = synthetic_dataset(64, seq_len=16, seed=1)
    adapter = get_adapter(model)
    losses = []
    for seed in range(4):
        fit = trainer.fit(adapter, data, SPEC, seed=seed)
        losses.append(fit.train_loss)
        adapter = (
            {name: t + fit.delta[name] for name, t in adapter.items()} if fit.delta else adapter
        )
        sent = fit.logits if fit.logits is not None else fit.delta
        assert all(t.device.type == "cpu" for t in sent.values())
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0], losses
