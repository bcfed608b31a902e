"""A task's training defaults follow its model's family; what a user sets wins."""

from __future__ import annotations

from aggregator.config import (
    PRETRAINED_ENCODER_KD_TRAIN,
    PRETRAINED_ENCODER_TRAIN,
    PRETRAINED_LM_TRAIN,
    PRETRAINED_LORA_SERVER_LR,
    AggregatorConfig,
    default_train,
)
from edgefed.settings import load_settings
from schemas.messages import LoraSpec, ModelRef, TrainSpec
from tests.assets_helpers import require_minilm, require_smollm2


def test_random_tiny_models_and_unknown_folders_keep_the_general_defaults(tmp_path) -> None:
    assert default_train("tiny") == TrainSpec()
    assert default_train(str(tmp_path / "nothing-here")) == TrainSpec()
    assert AggregatorConfig(federation="f").train == TrainSpec()


def test_a_pretrained_causal_lm_gets_small_steps_on_longer_rows() -> None:
    require_smollm2()
    config = AggregatorConfig(federation="f", model=ModelRef(name="smollm2-135m"))
    assert config.train == PRETRAINED_LM_TRAIN
    assert config.train.lr < TrainSpec().lr and config.train.seq_len > TrainSpec().seq_len


def test_fields_a_user_sets_are_laid_over_the_family_defaults(tmp_path) -> None:
    require_smollm2()
    path = tmp_path / "aggregator.toml"
    path.write_text('federation = "f"\nmodel = { name = "smollm2-135m" }\n[train]\nlr = 1e-3\n')
    config = load_settings(AggregatorConfig, path)
    assert config.train == PRETRAINED_LM_TRAIN.model_copy(update={"lr": 1e-3})
    whole = TrainSpec(local_steps=1)  # a whole TrainSpec is taken as it is
    given = AggregatorConfig(federation="f", model=ModelRef(name="smollm2-135m"), train=whole)
    assert given.train == whole


def test_a_pretrained_encoder_reads_whole_rows_at_a_gentler_rate() -> None:
    require_minilm()
    assert default_train("minilm-l6") == PRETRAINED_ENCODER_TRAIN
    assert PRETRAINED_ENCODER_TRAIN.seq_len > TrainSpec().seq_len
    assert PRETRAINED_ENCODER_TRAIN.lr < TrainSpec().lr


def test_an_encoder_that_distills_keeps_its_proxy_rows_short() -> None:
    require_minilm()
    kd = AggregatorConfig(federation="f", model=ModelRef(name="minilm-l6"), method="kd")
    assert kd.train == PRETRAINED_ENCODER_KD_TRAIN
    assert kd.train.seq_len < PRETRAINED_ENCODER_TRAIN.seq_len
    assert kd.train.lr == PRETRAINED_ENCODER_TRAIN.lr
    lora = AggregatorConfig(federation="f", model=ModelRef(name="minilm-l6"), method="lora")
    assert lora.train == PRETRAINED_ENCODER_TRAIN


def test_a_federation_that_takes_forward_gradients_gives_a_pretrained_lm_its_answer_rows() -> None:
    require_smollm2()
    model = ModelRef(name="smollm2-135m")
    rows = AggregatorConfig(
        federation="f", model=model, dataset="rotten-tomatoes", accept_methods=("fwdgrad",)
    ).lora
    assert rows.head_tokens == (3524, 2731)  # " negative", " positive"
    lora_only = AggregatorConfig(federation="f", model=model, dataset="rotten-tomatoes")
    assert lora_only.lora.head_tokens == ()
    own = AggregatorConfig(
        federation="f",
        model=model,
        dataset="rotten-tomatoes",
        method="fwdgrad",
        lora=LoraSpec(rank=4, head_tokens=(7,)),
    )
    assert own.lora == LoraSpec(rank=4, head_tokens=(7,))
    tokens = AggregatorConfig(federation="f", model=model, method="fwdgrad")  # synthetic rows
    assert tokens.lora.head_tokens == ()


def test_a_pretrained_model_federating_lora_alone_merges_at_twice_the_step() -> None:
    require_minilm()
    model = ModelRef(name="minilm-l6")
    assert AggregatorConfig(federation="f", model=model).strategy.server_lr == (
        PRETRAINED_LORA_SERVER_LR
    )
    assert AggregatorConfig(federation="f").strategy.server_lr == 1.0  # a random tiny model
    for other, server_lr in (
        ({"method": "fwdgrad"}, 1.0),
        ({"accept_methods": ("fwdgrad",)}, 1.0),
        ({"strategy": {"server_lr": 0.5}}, 0.5),
        ({"strategy": {"name": "fedasync"}}, 1.0),
        ({"sync": {"clients": ("a", "b")}}, 1.0),
    ):
        config = AggregatorConfig.model_validate({"federation": "f", "model": model} | other)
        assert config.strategy.server_lr == server_lr, other
