"""Tokenization like vLLM: encode/decode, chat templates, caching, the /tokenize fallback."""

from __future__ import annotations

import asyncio
import gc
import threading
import tracemalloc

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from kvindex.demo_tokenizer import _train, build_demo_tokenizer
from kvindex.tokenize import (
    ENTRY_OVERHEAD,
    CachingTokenizer,
    ChatOptions,
    ChatTemplateError,
    PoolBusy,
    PromptTooLong,
    TemplateLimitError,
    TemplateSandbox,
    TextTooLong,
    TokenizePool,
    Tokenizer,
    TokenizerLoadError,
    load_tokenizer,
    remote_tokenize,
    resolve_template_kwargs,
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
    c = CachingTokenizer(tok, max_bytes=1 << 20)
    a = c.encode("one two three")
    assert c.encode("one two three") == a and c.hits == 1
    msgs = [{"role": "user", "content": "hi"}]
    assert c.encode_chat(msgs) == tok.encode_chat(msgs)
    assert c.encode_chat(msgs) == tok.encode_chat(msgs) and c.hits == 2
    assert c.encode("one two three", add_special_tokens=False) == a and c.hits == 2  # another key


def _entry(n_tokens: int) -> int:
    return 4 * n_tokens + ENTRY_OVERHEAD


def test_caching_tokenizer_is_lru_within_its_byte_bound(tok):
    lengths = {f"word {i}": len(tok.encode(f"word {i}")) for i in range(60)}
    n = max(set(lengths.values()), key=list(lengths.values()).count)
    same = [w for w, k in lengths.items() if k == n][:9]  # entries of one size
    assert len(same) == 9
    c = CachingTokenizer(tok, max_bytes=8 * _entry(n) + _entry(n) // 2)  # room for eight of them
    for w in same[:8]:
        c.encode(w)
    c.encode(same[0])  # a hit makes it the most recent
    c.encode(same[8])  # evicts same[1], the least recently used
    assert (c.hits, c.misses) == (1, 9) and len(c) == 8
    assert c.nbytes == 8 * _entry(n) <= c.max_bytes
    c.encode(same[0])
    assert c.hits == 2
    c.encode(same[1])
    assert c.misses == 10  # same[1] had gone


def test_cache_holds_its_byte_bound_under_big_prompts(tok):
    """Memory: several big prompts (~100k tokens each) never take the cache past its bound, and
    the cache keeps neither the prompt texts nor Python int lists (4 bytes per token)."""
    bound = 2 << 20
    c = CachingTokenizer(tok, max_bytes=bound)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(12):
            text = f"prompt {i}: " + "the gateway routes the request to a replica " * 4500  # ~200k characters, ~45k tokens
            ids = c.encode(text)
            assert len(ids) > 40_000
            assert c.nbytes <= bound
            del text, ids
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert c.nbytes <= bound and 2 <= len(c) < 12  # entries of ~180 KB: some were evicted
    assert retained < bound + (256 << 10), retained
    # an entry bigger than an eighth of the bound is not cached at all: one prompt cannot flush the rest
    before = dict(c._cache)
    c.encode("huge " + "the gateway routes the request to a replica " * 8000)
    assert dict(c._cache) == before


def test_encode_matches_hf_encode_and_counts_past_a_limit(tok):
    text = "Tokenize off the loop: the ids are those of the plain encode. " * 20
    assert tok.encode(text) == tok._tok.encode(text).ids
    n = len(tok.encode(text))
    assert tok.encode(text, max_tokens=n) == tok._tok.encode(text).ids
    with pytest.raises(PromptTooLong) as e:
        tok.encode(text, max_tokens=n - 1)
    assert (e.value.tokens, e.value.limit) == (n, n - 1)  # vLLM's count: the limit + 1 (truncated tokenization)
    # a text many times longer than the limit is refused on a prefix probe, same answer
    with pytest.raises(PromptTooLong) as e:
        tok.encode(text * 50, max_tokens=100)
    assert (e.value.tokens, e.value.limit) == (101, 100)
    c = CachingTokenizer(tok)
    c.encode(text)  # cached without a limit, then asked with one
    with pytest.raises(PromptTooLong):
        c.encode(text, max_tokens=n - 1)
    assert tok.max_chars_per_token == max(len(t) for t in tok._tok.get_vocab(with_added_tokens=True))


def test_template_kwargs_resolved_like_vllm(tok):
    tpl = "{% for m in messages %}{{ m.content }}{% endfor %}|{{ flavour }}|{{ add_generation_prompt }}|{{ tools }}"
    msgs = [{"role": "user", "content": "x"}]
    # transformers' own parameters never reach the template; keys the template does not read are dropped
    out = tok.apply_chat_template(msgs, chat_template=tpl, flavour="mint", tokenize=True, return_dict=True, unused=1)
    assert out == "x|mint|True|None"
    # ``messages`` next to the render's own: vLLM's 400 carries Python's TypeError
    with pytest.raises(ChatTemplateError, match=r"^jinja2.environment.Template.render\(\) got multiple values for keyword argument 'messages'$"):
        tok.apply_chat_template(msgs, chat_template=tpl, messages=[])
    # a template that does not read ``messages``: the key is dropped, as vLLM's filter does
    assert tok.apply_chat_template(msgs, chat_template="{{ flavour }}", messages=[], flavour="x") == "x"
    assert resolve_template_kwargs(frozenset({"a", "messages"}), {"a": 1, "b": 2, "padding": True}) == {"a": 1}


def test_templates_that_raise_give_their_reason(tok):
    msgs = [{"role": "user", "content": "x"}]
    for tpl, reason in [
        ("{{ raise_exception('no system role here') }}", "no system role here"),
        ("{{ 1 // 0 }}", "integer division or modulo by zero"),
        ("{{ messages.nope.deeper }}", "'list object' has no attribute 'nope'"),
        ("{% for %}", "Expected an expression, got 'end of statement block'"),
    ]:
        with pytest.raises(ChatTemplateError) as e:
            tok.apply_chat_template(msgs, chat_template=tpl)
        assert str(e.value) == reason
    with pytest.raises(ChatTemplateError, match=r"^As of transformers v4\.44"):
        Tokenizer(tok._tok, {}).apply_chat_template(msgs)


@pytest.fixture(scope="module")
def sandbox():
    s = TemplateSandbox(timeout_s=1.0, max_chars=50_000, memory_bytes=512 << 20)
    yield s
    s.close()


def test_sandbox_renders_and_reuses_its_process(tok, sandbox):
    msgs = [{"role": "user", "content": "hello"}]
    kw = {"special": tok.special, "add_generation_prompt": True}
    assert sandbox.render(tok.chat_template, msgs, **kw) == tok.apply_chat_template(msgs)
    spawned = sandbox.spawned
    assert sandbox.render("{{ eos_token }}{{ messages[0].content }}", msgs, **kw) == "<|im_end|>hello"
    assert sandbox.spawned == spawned  # the idle process took the second job


@pytest.mark.parametrize(
    "template,match",
    [
        ("{{ 'ab ' * 1000000 }}", "exceed 50000 characters"),
        ("{{ 2 ** 100000000 }}", "exceed 50000 characters"),
        ("{% for i in range(50000) %}{{ 'xy' }}{% endfor %}", "exceeds 50000 characters"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "longer than 1.0 s"),
    ],
)
def test_sandbox_caps(sandbox, template, match):
    with pytest.raises(TemplateLimitError, match=match):
        sandbox.render(template, [{"role": "user", "content": "x"}])
    assert sandbox.render("{{ messages[0].content }}", [{"role": "user", "content": "fine"}]) == "fine"


def test_sandbox_memory_limit():
    """Doubling with ~ (not an intercepted operator): the process's memory limit stops it. Its
    own sandbox with a long timeout, since faulting in ~1 GB of pages can pass 1 s on a busy VM."""
    s = TemplateSandbox(timeout_s=30.0, max_chars=50_000, memory_bytes=512 << 20)
    try:
        template = "{% set ns = namespace(s='x' * 40000) %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}"
        with pytest.raises(TemplateLimitError, match="memory limit"):
            s.render(template, [{"role": "user", "content": "x"}])
        assert s.render("{{ messages[0].content }}", [{"role": "user", "content": "fine"}]) == "fine"
    finally:
        s.close()


def test_sandbox_reports_template_errors(sandbox):
    with pytest.raises(ChatTemplateError) as e:
        sandbox.render("{{ raise_exception('nope') }}", [{"role": "user", "content": "x"}])
    assert str(e.value) == "nope" and not isinstance(e.value, TemplateLimitError)


def test_request_template_goes_through_the_sandbox(tok, sandbox):
    c = CachingTokenizer(tok, sandbox=sandbox)
    msgs = [{"role": "user", "content": "hi"}]
    opts = ChatOptions(chat_template="{{ messages[0].content }} there")
    assert c.chat_tokens(msgs, opts) == tok.encode("hi there", add_special_tokens=False)
    with pytest.raises(TemplateLimitError):
        c.chat_tokens(msgs, ChatOptions(chat_template="{{ 'ab ' * 1000000 }}"))
    with pytest.raises(ChatTemplateError):
        CachingTokenizer(tok).chat_tokens(msgs, opts)  # no sandbox: request templates are not rendered
    with pytest.raises(TextTooLong) as e:
        c.chat_tokens(msgs, ChatOptions(chat_template="{{ 'abc' * 100 }}"), max_chars=200)
    assert (e.value.chars, e.value.limit) == (300, 200)


def test_tokenize_pool_bounds_its_backlog():
    async def go():
        pool = TokenizePool(workers=1, max_pending=2, max_pending_bytes=1000)
        gate = threading.Event()
        first = asyncio.ensure_future(pool.run(gate.wait, 5, weight=900))
        await asyncio.sleep(0.05)
        with pytest.raises(PoolBusy):  # by bytes: 900 + 200 > 1000
            await pool.run(int, weight=200)
        second = asyncio.ensure_future(pool.run(int, "7", weight=50))
        await asyncio.sleep(0.05)
        with pytest.raises(PoolBusy):  # by count
            await pool.run(int)
        second.cancel()  # a queued job a client gave up on leaves the backlog
        await asyncio.sleep(0.05)
        assert pool.pending == 1
        gate.set()
        assert await first is True
        assert pool.pending == 0 and pool.pending_bytes == 0 and pool.refused == 2
        assert await pool.run(len, "x" * 5000, weight=5000) == 5000  # an idle pool takes any one job
        pool.shutdown()

    asyncio.run(go())


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


def test_chat_cache_key_tells_every_option_apart(tok):
    """A cached chat is reused only for the same messages and options: each option changed is a
    miss with the tokens of its own render, never the cached ones."""
    c = CachingTokenizer(tok, max_bytes=1 << 20)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    variants = [
        ChatOptions(),
        ChatOptions(add_generation_prompt=False),
        ChatOptions(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ChatOptions(template_kwargs={"enable_thinking": True}),
        ChatOptions(documents=[{"title": "t", "text": "d"}]),
    ]
    for opts in variants:
        assert c.chat_tokens(msgs, opts) == c.tokenizer.encode(
            c.tokenizer.apply_chat_template(
                msgs,
                add_generation_prompt=opts.add_generation_prompt,
                tools=opts.tools,
                documents=opts.documents,
                **dict(opts.template_kwargs),
            ),
            add_special_tokens=False,
        )
    hits = c.hits
    assert c.chat_tokens(msgs, ChatOptions()) == c.chat_tokens([dict(m) for m in msgs], ChatOptions())  # same material: hits
    assert c.hits == hits + 2
    # key order inside a message does not matter; a value does
    assert c.chat_tokens([{"content": "be brief", "role": "system"}, msgs[1]], ChatOptions()) == c.chat_tokens(msgs, ChatOptions())
    assert c.chat_tokens([msgs[0], {"role": "user", "content": "hi!"}], ChatOptions()) != c.chat_tokens(msgs, ChatOptions())
