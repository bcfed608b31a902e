r"""Labelled text turned into the token datasets a model trains and is scored on.

A causal LM classifies by generating the label: each row becomes a prompt such as
``Review: <text>\\nSentiment:`` followed by one label token (`` positive`` /
`` negative``, with the leading space: without it they are other tokens). Only that
token is scored, and accuracy compares the label tokens' logits against each other
(``TokenDataset.choices``). Rows are left-padded so every answer sits in the last
column, which lets the LM head run on one position (``edgefed.ml.objectives``). Texts that
do not fit are cut; the prompt's frame and the answer never are.

An encoder (MiniLM) gets the plain text, right-padded as BERT expects, and one class id
per row for its classification head.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from edgefed.data.sources import TaskFamily, TextExamples, is_text_spec, load_examples
from edgefed.ml.models import ModelKind, load_tokenizer, model_kind
from edgefed.ml.tokens import IGNORE_INDEX, TokenDataset
from schemas.errors import ConfigError
from schemas.messages import ModelRef

PROMPTS: dict[TaskFamily, tuple[str, str]] = {
    "sentiment": ("Review:", "\nSentiment:"),
    "topic": ("Article:", "\nTopic:"),
    "newsgroup": ("Message:", "\nNewsgroup:"),
}
"""Family -> (text before, text after) the example; the label token follows."""

LABEL_WORDS: dict[str, str] = {
    "negative": "negative",
    "positive": "positive",
    "World": "world",
    "Sports": "sports",
    "Business": "business",
    "Sci/Tech": "technology",
    "alt.atheism": "atheism",
    "comp.graphics": "graphics",
    "comp.os.ms-windows.misc": "windows",
    "comp.sys.ibm.pc.hardware": "pc",
    "comp.sys.mac.hardware": "mac",
    "comp.windows.x": "x",
    "misc.forsale": "sale",
    "rec.autos": "cars",
    "rec.motorcycles": "motorcycles",
    "rec.sport.baseball": "baseball",
    "rec.sport.hockey": "hockey",
    "sci.crypt": "encryption",
    "sci.electronics": "electronics",
    "sci.med": "medicine",
    "sci.space": "space",
    "soc.religion.christian": "Christian",
    "talk.politics.guns": "guns",
    "talk.politics.mideast": "Israel",
    "talk.politics.misc": "politics",
    "talk.religion.misc": "religion",
}
"""Label name -> the word a causal LM answers with; other names answer as themselves."""


def label_tokens(tokenizer: PreTrainedTokenizerBase, names: Sequence[str]) -> tuple[int, ...]:
    """The answer token of each label: the first token of ``" " + word``.

    Raises:
        ConfigError: Two labels would share an answer token.
    """
    ids: list[int] = []
    for name in names:
        word = LABEL_WORDS.get(name, name)
        pieces = _token_ids(tokenizer, [" " + word])[0]
        if not pieces:
            raise ConfigError(f"label {name!r} has no tokens")
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise ConfigError(f"labels {list(names)} do not start with distinct tokens")
    return tuple(ids)


@functools.cache
def answer_tokens(dataset: str, model: str) -> tuple[int, ...]:
    """The answer token of each of ``dataset``'s labels for causal LM ``model``.

    Empty if ``dataset`` is not text. Labels are read from its test split, once per process.

    Raises:
        AssetMissing: The model or the source is not installed.
        ConfigError: Labels that share an answer token, or a model without a tokenizer.
    """
    if not is_text_spec(dataset):
        return ()
    source = dataset.partition(":")[0]
    names = load_examples(f"{source}:split=test,n=1").label_names
    return label_tokens(load_tokenizer(model), names)


def _token_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    encoded = tokenizer(list(texts), add_special_tokens=False)
    ids: list[list[int]] = encoded["input_ids"]
    return ids


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def encode_causal(
    examples: TextExamples, tokenizer: PreTrainedTokenizerBase, *, seq_len: int
) -> TokenDataset:
    """Prompt + answer token per row, left-padded to ``seq_len``; only the answer is scored.

    Raises:
        ConfigError: ``seq_len`` cannot hold the prompt frame, a text token and the answer.
    """
    before, after = PROMPTS[examples.family]
    frame_before, frame_after = _token_ids(tokenizer, [before, after])
    answers = label_tokens(tokenizer, examples.label_names)
    room = seq_len - len(frame_before) - len(frame_after) - 1
    if room < 1:
        raise ConfigError(f"seq_len {seq_len} is too short for the {examples.family} prompt")
    texts = _token_ids(tokenizer, [" " + " ".join(t.split()) for t in examples.texts])
    pad = _pad_id(tokenizer)
    n = len(examples)
    input_ids = torch.full((n, seq_len), pad, dtype=torch.int64)
    mask = torch.zeros((n, seq_len), dtype=torch.int64)
    labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.int64)
    for row, (text, label) in enumerate(zip(texts, examples.labels, strict=True)):
        answer = answers[label]
        tokens = [*frame_before, *text[:room], *frame_after, answer]
        input_ids[row, seq_len - len(tokens) :] = torch.tensor(tokens, dtype=torch.int64)
        mask[row, seq_len - len(tokens) :] = 1
        labels[row, -1] = answer
    return TokenDataset(input_ids=input_ids, labels=labels, attention_mask=mask, choices=answers)


def encode_classifier(
    examples: TextExamples, tokenizer: PreTrainedTokenizerBase, *, seq_len: int
) -> TokenDataset:
    """The text with the tokenizer's special tokens, right-padded; one class per row."""
    encoded = tokenizer(
        list(examples.texts),
        truncation=True,
        max_length=seq_len,
        padding="max_length",
        return_tensors="pt",
    )
    return TokenDataset(
        input_ids=encoded["input_ids"].to(torch.int64),
        labels=torch.tensor(examples.labels, dtype=torch.int64),
        attention_mask=encoded["attention_mask"].to(torch.int64),
    )


def encode(
    examples: TextExamples, *, tokenizer: PreTrainedTokenizerBase, kind: ModelKind, seq_len: int
) -> TokenDataset:
    """Encode ``examples`` the way a model of ``kind`` is trained on them.

    Raises:
        ConfigError: No examples, or ``seq_len`` too short.
    """
    if not len(examples):
        raise ConfigError("no examples to encode")
    if kind == "causal":
        return encode_causal(examples, tokenizer, seq_len=seq_len)
    return encode_classifier(examples, tokenizer, seq_len=seq_len)


def load_text_data(spec: str, *, seq_len: int, model: ModelRef | str) -> TokenDataset:
    """Read the examples ``spec`` names and encode them for ``model``.

    Raises:
        AssetMissing: The model or the source is not installed (names the command).
        ConfigError: Bad spec, missing data directory, or a model without a tokenizer.
    """
    tokenizer = load_tokenizer(model)
    return encode(load_examples(spec), tokenizer=tokenizer, kind=model_kind(model), seq_len=seq_len)
