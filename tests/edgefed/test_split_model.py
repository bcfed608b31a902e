"""The cut model's blocks against transformers' own forward, on padded batches."""

import pytest
import torch

from edgefed.ml.models import attach_lora, build_model
from edgefed.ml.split_model import causal_mask, embed, run_blocks
from schemas.messages import LoraSpec


def test_causal_mask_blocks_the_future_and_padding():
    hidden = torch.zeros(2, 3, 4)
    padding = torch.tensor([[1, 1, 1], [0, 1, 1]])
    mask = causal_mask(hidden, padding)
    assert mask.shape == (2, 1, 3, 3)
    allowed = mask == 0
    assert allowed[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # The second row's first token is padding: no query may attend to it.
    assert allowed[1, 0].tolist() == [
        [False, False, False],
        [False, True, False],
        [False, True, True],
    ]
    assert float(mask.min()) == torch.finfo(torch.float32).min


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_run_blocks_equal_the_whole_decoder_on_a_padded_batch(attention: str):
    model = attach_lora(build_model("tiny-4l"), LoraSpec(rank=4))
    model.get_base_model().set_attn_implementation(attention)
    model.eval()
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    padding = torch.ones_like(ids)
    padding[1, :4] = 0  # left padding
    padding[2, 6:] = 0  # right padding
    decoder = model.get_base_model().model
    with torch.no_grad():
        expected = decoder(input_ids=ids, attention_mask=padding).last_hidden_state
        first = run_blocks(model, embed(model, ids), padding, 0, 2)
        hidden = decoder.norm(run_blocks(model, first, padding, 2, 4))
    real = padding.bool()
    torch.testing.assert_close(hidden[real], expected[real], atol=1e-5, rtol=1e-5)
