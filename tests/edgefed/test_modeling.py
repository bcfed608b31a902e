import pytest
import torch

from edgefed.library_internals import attention_implementation
from edgefed.ml.models import (
    TINY_VOCAB,
    adapter_parameters,
    adapter_shapes,
    attach_lora,
    build_model,
    get_adapter,
    lora_spec,
    set_adapter,
    set_torch_threads,
    tiny_config,
)
from schemas.errors import ConfigError
from schemas.messages import LoraSpec, ModelRef


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tiny_config_shape():
    config = tiny_config()
    assert config.vocab_size == TINY_VOCAB
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (2, 64, 4)
    assert attention_implementation(config) == "eager"
    assert config.tie_word_embeddings is False
    assert tiny_config(layers=4, hidden=32).num_hidden_layers == 4
    with pytest.raises(ConfigError):
        tiny_config(hidden=30)


def test_build_model_same_seed_bit_identical_and_rng_untouched():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = _weights(build_model("tiny", seed=7))
    assert torch.equal(torch.rand(3), expected_next)  # caller's RNG stream not consumed
    second = _weights(build_model(ModelRef(name="tiny"), seed=7))
    other = _weights(build_model("tiny", seed=8))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_build_model_tiny_4l_has_four_layers():
    assert build_model("tiny-4l").config.num_hidden_layers == 4


def test_build_model_loads_local_folder(tmp_path):
    model = build_model("tiny", seed=3)
    model.save_pretrained(tmp_path)
    loaded = build_model(str(tmp_path))
    original, again = _weights(model), _weights(loaded)
    assert all(torch.equal(original[k], again[k]) for k in original)


def test_build_model_unknown_name_or_folder(tmp_path):
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("no-such-model")
    with pytest.raises(ConfigError, match=r"config\.json"):
        build_model(str(tmp_path))


def test_attach_lora_same_seed_identical_init_independent_of_global_rng():
    torch.manual_seed(1)
    first = get_adapter(attach_lora(build_model("tiny"), LoraSpec(seed=5)))
    torch.manual_seed(2)
    second = get_adapter(attach_lora(build_model("tiny"), LoraSpec(seed=5)))
    third = get_adapter(attach_lora(build_model("tiny"), LoraSpec(seed=6)))
    assert all(torch.equal(first[k], second[k]) for k in first)
    a_names = [k for k in first if ".lora_A." in k]
    assert a_names
    assert not any(torch.equal(first[k], third[k]) for k in a_names)
    assert all(not first[k].any() for k in first if ".lora_B." in k)  # B starts at zero


def test_adapter_names_have_no_peft_suffix_and_are_sorted():
    model = attach_lora(build_model("tiny"), LoraSpec(rank=4))
    adapter = get_adapter(model)
    names = list(adapter)
    assert names == sorted(names)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in adapter
    assert not any(".default." in n for n in names)
    assert len(names) == 2 * 2 * 2  # layers x (q, v) x (A, B)
    assert adapter_shapes(model)[
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    ] == (
        64,
        4,
    )
    for tensor in adapter.values():
        assert tensor.dtype == torch.float32
        assert tensor.device.type == "cpu"
        assert not tensor.requires_grad


def test_get_adapter_returns_copies():
    model = attach_lora(build_model("tiny"), LoraSpec())
    snapshot = get_adapter(model)
    name = next(iter(snapshot))
    snapshot[name].add_(1.0)
    assert not torch.equal(get_adapter(model)[name], snapshot[name])


def test_set_adapter_round_trip():
    model = attach_lora(build_model("tiny"), LoraSpec())
    gen = torch.Generator().manual_seed(0)
    new = {k: torch.randn(v.shape, generator=gen) for k, v in get_adapter(model).items()}
    set_adapter(model, {k: v.to(torch.float16) for k, v in new.items()})
    back = get_adapter(model)
    assert all(torch.equal(back[k], new[k].to(torch.float16).float()) for k in new)
    set_adapter(model, new)
    back = get_adapter(model)
    assert all(torch.equal(back[k], new[k]) for k in new)


def test_set_adapter_is_strict_and_atomic():
    model = attach_lora(build_model("tiny"), LoraSpec())
    good = get_adapter(model)
    names = list(good)
    missing = {k: v for k, v in good.items() if k != names[0]}
    with pytest.raises(ConfigError, match="missing") as info:
        set_adapter(model, missing)
    assert names[0] in str(info.value)
    with pytest.raises(ConfigError, match=r"unexpected.*bogus"):
        set_adapter(model, {**good, "bogus.lora_A.weight": torch.zeros(1)})
    changed = {k: v + 1 for k, v in good.items()}
    changed[names[1]] = torch.zeros(3, 3)
    with pytest.raises(ConfigError, match=r"shape \(3, 3\)"):
        set_adapter(model, changed)
    ints = {**good, names[0]: good[names[0]].to(torch.int32)}
    with pytest.raises(ConfigError, match="floating"):
        set_adapter(model, ints)
    after = get_adapter(model)
    assert all(torch.equal(after[k], good[k]) for k in good)  # nothing partially copied


def test_ffa_freezes_a_and_exposes_only_b():
    spec = LoraSpec(mode="ffa", seed=9)
    model = attach_lora(build_model("tiny"), spec)
    assert lora_spec(model) == spec
    adapter = get_adapter(model)
    assert adapter
    assert all(".lora_B." in n for n in adapter)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(adapter)
    assert set(adapter_parameters(model)) == set(adapter)
    # the frozen A equals the A a standard-mode participant with the same seed draws
    standard = get_adapter(attach_lora(build_model("tiny"), LoraSpec(seed=9)))
    a_std = {n: t for n, t in standard.items() if ".lora_A." in n}
    a_ffa = {
        n.replace(".lora_A.default.", ".lora_A."): p.detach()
        for n, p in model.named_parameters()
        if ".lora_A." in n
    }
    assert a_std.keys() == a_ffa.keys()
    assert all(torch.equal(a_std[n], a_ffa[n]) for n in a_std)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_A." in n)


def test_attach_lora_unknown_target_is_config_error():
    with pytest.raises(ConfigError, match="nope"):
        attach_lora(build_model("tiny"), LoraSpec(target_modules=("nope",)))


def test_adapter_helpers_need_attached_model():
    with pytest.raises(ConfigError, match="attach_lora"):
        get_adapter(build_model("tiny"))


def test_set_torch_threads():
    before = torch.get_num_threads()
    try:
        assert set_torch_threads(1) == 1
        assert set_torch_threads() == 1
        with pytest.raises(ConfigError):
            set_torch_threads(0)
    finally:
        torch.set_num_threads(before)
