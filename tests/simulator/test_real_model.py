"""A real LLM federated over the real broker: SmolLM2-135M, two agents, a few LoRA steps."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from simulator.fleet import FleetConfig, aggregator_config, run_fleet
from simulator.workload import Scorer
from tests.assets_helpers import require_smollm2

pytestmark = [pytest.mark.broker, pytest.mark.slow]

CLIENT_DATA = "rotten-tomatoes:split=train,n=16"
"""The 16 reviews the two agents split between them; the aggregator scores exactly these."""


async def test_smollm2_federation_lowers_client_loss_and_exports_a_peft_adapter(
    mosquitto_url: str, federation: str, tmp_path
) -> None:
    folder = require_smollm2()
    config = FleetConfig(
        model="smollm2-135m",
        agents=2,
        dataset="rotten-tomatoes",
        train_samples=16,
        slowdowns=(1.0,),
        max_versions=2,
        ack_timeout_s=300.0,
        federation=federation,
        trainer={"lora": {"loss": "vocabulary"}},  # the loss the aggregator reports
        aggregator={
            "train": {"local_steps": 2, "batch_size": 4, "seq_len": 32, "lr": 2e-3},
            "strategy": {"buffer_size": 2},
            "eval_data": CLIENT_DATA,
        },
    )
    result = await run_fleet(config, url=mosquitto_url, progress=False)
    history = result.results["history"]
    losses = [h["eval_loss"] for h in history]
    assert [h["version"] for h in history] == [0, 1, 2]
    assert losses[-1] < 0.7 * losses[0], losses
    merged = result.results["merges"]
    assert len(merged) >= 4 and set(merged.values()) == {1}
    assert all(a.bytes_down > 0 for a in result.agents)
    assert {u["client_id"] for u in result.results["updates"]} == {"dev000", "dev001"}

    agg = aggregator_config(config)
    scorer = Scorer(
        model=agg.model,
        lora=agg.lora,
        seed=agg.seed,
        dataset=agg.dataset,
        eval_data=CLIENT_DATA,
        seq_len=agg.train.seq_len,
    )
    # A freshly built model given the final global scores what the aggregator reported.
    assert scorer.score(result.final_adapter).loss == pytest.approx(losses[-1], rel=1e-4)
    adapter_dir = scorer.export(result.final_adapter, tmp_path / "adapter")
    assert (adapter_dir / "adapter_config.json").is_file()

    base = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    with warnings.catch_warnings():  # peft asks transformers for a renamed attribute
        warnings.simplefilter("ignore", FutureWarning)
        reloaded = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ours = scorer.model.eval()
    batch = next(scorer.data.batches(8, generator=None))
    with torch.inference_mode():
        theirs_logits = reloaded(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).logits
        our_logits = ours(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.equal(our_logits, theirs_logits)
