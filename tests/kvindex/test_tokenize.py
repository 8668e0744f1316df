"""Tokenization like vLLM: encode/decode, chat templates, caching, the /tokenize fallback."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from kvindex.demo_tokenizer import _train, build_demo_tokenizer
from kvindex.tokenize import (
    CachingTokenizer,
    ChatTemplateError,
    Tokenizer,
    TokenizerLoadError,
    load_tokenizer,
    remote_tokenize,
)
from tests.helpers.net import free_port


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer("demo")


def test_demo_tokenizer_is_deterministic_and_cached(tmp_path):
    assert _train() == _train()
    d = build_demo_tokenizer(tmp_path / "t")
    mtime = (d / "tokenizer.json").stat().st_mtime_ns
    assert build_demo_tokenizer(tmp_path / "t") == d
    assert (d / "tokenizer.json").stat().st_mtime_ns == mtime


def test_encode_decode_round_trip(tok):
    text = "The gateway routes request 42 to the replica holding the prefix."
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids) and len(ids) > 5
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=False) == ids  # no BOS for this ChatML model


def test_chat_template_renders_chatml(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False).endswith("Hi<|im_end|>\n")
    ids = tok.encode_chat(msgs)
    im_start = tok._tok.token_to_id("<|im_start|>")
    assert ids[0] == im_start and ids.count(im_start) == 3  # special tokens are single ids


def test_list_content_text_parts(tok):
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "there"}]}
    ]
    assert "Hello there" in tok.apply_chat_template(msgs)


def test_template_errors_are_chat_template_errors(tok):
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template([{"content": "no role"}])
    with pytest.raises(ChatTemplateError, match="only user"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ raise_exception('only user turns') }}")
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% for %}")


def test_tools_and_kwargs_reach_the_template(tok):
    tpl = "{{ tools | tojson }}|{{ flavour }}|{{ eos_token }}"
    out = tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template=tpl, tools=[{"name": "f"}], flavour="mint")
    assert out == '[{"name": "f"}]|mint|<|im_end|>'


def test_caching_tokenizer_hits(tok):
    c = CachingTokenizer(tok, max_entries=2)
    a = c.encode("one two three")
    assert c.encode("one two three") == a and c.hits == 1
    msgs = [{"role": "user", "content": "hi"}]
    assert c.encode_chat(msgs) == tok.encode_chat(msgs)
    assert c.encode_chat(msgs) == tok.encode_chat(msgs) and c.hits == 2
    c.encode("x")
    c.encode("y")
    assert len(c._cache) == 2  # bounded


def test_caching_tokenizer_is_lru(tok):
    c = CachingTokenizer(tok, max_entries=2)
    c.encode("alpha")
    c.encode("beta")
    c.encode("alpha")  # a hit makes it the most recent
    c.encode("gamma")  # evicts beta, the least recently used
    assert (c.hits, c.misses) == (1, 3)
    c.encode("alpha")
    assert c.hits == 2
    c.encode("beta")
    assert c.misses == 4  # beta had gone


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerLoadError):
        load_tokenizer(str(tmp_path / "nope"))
    # a hub id is never fetched: only local directories (and "demo") load
    with pytest.raises(TokenizerLoadError, match="not a directory"):
        load_tokenizer("Qwen/Qwen2.5-7B-Instruct")


def test_chat_template_helpers_match_transformers(tok):
    """transformers' rendering rules: its tojson (no HTML escaping, indent/sort_keys honoured),
    {% generation %} blocks rendered as their body, trim_blocks/lstrip_blocks."""
    tpl = "{% for m in messages %}\n  {% generation %}[{{ m.content }}]{% endgeneration %}\n{% endfor %}{{ {'b': '<&>', 'a': 'é'} | tojson(sort_keys=True) }}"
    out = tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], chat_template=tpl)
    assert out == '[x][y]{"a": "é", "b": "<&>"}'


def test_remote_tokenize_speaks_vllm_json(tok):
    seen = []

    async def tokenize(request: Request):
        body = await request.json()
        seen.append(body)
        ids = tok.encode_chat(body["messages"]) if "messages" in body else tok.encode(body["prompt"], body.get("add_special_tokens", True))
        return JSONResponse({"count": len(ids), "max_model_len": 8192, "tokens": ids, "token_strs": None})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/tokenize", tokenize, methods=["POST"])]), port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        while not server.started:
            pass

        async def go():
            async with httpx.AsyncClient() as client:
                a = await remote_tokenize(client, f"http://127.0.0.1:{port}", "m", prompt="hello world")
                b = await remote_tokenize(client, f"http://127.0.0.1:{port}", "m", messages=[{"role": "user", "content": "hi"}])
                tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
                await remote_tokenize(
                    client,
                    f"http://127.0.0.1:{port}",
                    "m",
                    messages=[{"role": "assistant", "content": "so"}],
                    add_generation_prompt=False,
                    continue_final_message=True,
                    tools=tools,
                    chat_template_kwargs={"enable_thinking": False},
                )
                return a, b

        a, b = asyncio.run(go())
        assert a == tok.encode("hello world")
        assert b == tok.encode_chat([{"role": "user", "content": "hi"}])
        assert seen[1]["add_generation_prompt"] is True and seen[1]["add_special_tokens"] is False
        assert "tools" not in seen[1] and "continue_final_message" not in seen[1]
        # everything that changes the rendered template reaches the replica
        assert seen[2]["continue_final_message"] is True and seen[2]["add_generation_prompt"] is False
        assert seen[2]["tools"][0]["function"]["name"] == "f" and seen[2]["chat_template_kwargs"] == {"enable_thinking": False}
    finally:
        server.should_exit = True
        t.join(5)
