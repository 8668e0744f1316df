"""Issue 12, tokenization: no client can stall, crash or unlock the gateway through its prompt.

Through the real gateway (uvicorn on loopback) in front of simulated replicas:
* a 10 MB prompt is tokenized off the event loop: a short request sent while it is being
  tokenized is answered before that tokenization ends;
* prompts that cannot fit the model's ``max_model_len`` (reported by the replicas) are refused
  before anything reaches a replica, with vLLM 0.33's own 400s (message and param);
* a request-supplied chat template (body ``chat_template`` or ``chat_template_kwargs``) is
  refused unless ``trust_request_chat_template`` is set, as vLLM does; when allowed, its render
  is capped in time and size, and a template that raises is a 400 with the template's reason;
* token-id prompts with ids outside uint32, negative or non-int items are 400s, never 500s;
* ``chat_template_kwargs`` holding ``messages`` is the 400 vLLM answers.

The gateway's own answers are told apart from the simulator's by their wording: the simulator
(modelled on an older vLLM) words its length errors differently from vLLM 0.33.
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from simulator.fleet import SimConfig, SimFleet
from tests.helpers.gateway import MODEL, GatewayThread, fleet_config, fleet_fixture, get_metrics, metric_value

L = 8192  # the simulator's default max_model_len, reported on /v1/models
UNTRUSTED = "Chat template is passed with request, but --trust-request-chat-template is not set. Refused request with untrusted chat template."
USER = [{"role": "user", "content": "hello there"}]


def _err(r: httpx.Response) -> dict:
    assert r.headers["content-type"].startswith("application/json"), r.text[:200]
    body = r.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    return body["error"]


def _models_known(g: GatewayThread, max_len: int) -> None:
    """Wait until the gateway learned max_model_len from the replicas' /v1/models."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        info = g.gateway.fleet.resolve_model(MODEL)
        if info is not None and info.max_model_len == max_len:
            return
        time.sleep(0.05)
    raise AssertionError("the gateway never learned max_model_len")


fleet = fleet_fixture(1, time_scale=0.01)


@pytest.fixture(scope="module")
def gw(fleet):
    with GatewayThread(fleet_config(fleet.handles)) as g:
        _models_known(g, L)
        yield g


@pytest.fixture(scope="module")
def trusting_gw(fleet):
    """A gateway that trusts request chat templates, with small render caps."""
    cfg = fleet_config(
        fleet.handles,
        models={MODEL: {"tokenizer": "demo", "trust_request_chat_template": True}},
        tokenize={"template_timeout_s": 1.0, "template_max_chars": 100_000},
    )
    with GatewayThread(cfg) as g:
        _models_known(g, L)
        yield g


def _post(g: GatewayThread, path: str, body: dict, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{g.url}/v1/{path}", json=body, timeout=timeout)


# -- the event loop is never blocked by a big prompt ---------------------------------------------


def test_short_request_answered_while_a_10mb_prompt_is_tokenized():
    """The replicas report a max_model_len big enough (1M tokens ≥ 10 MB / 13 chars per token) that
    the 10 MB prompt passes the cheap character bound, so the gateway must tokenize it (seconds),
    then refuses it (≈4M tokens > 1M) — its answer marks the end of its tokenization; it never
    reaches a replica. A short request sent meanwhile must be answered before that: the big one
    is still in flight, and the gateway's tokenize-stage histogram (observed after each
    successful tokenization) counts the short request only. Before the fix the big prompt was
    tokenized on the event loop: the short request was answered only after it."""
    big_len = 1_000_000
    fleet = SimFleet([SimConfig(model=MODEL, seed=0, time_scale=0.01, max_model_len=big_len)])
    fleet.start()
    try:
        with GatewayThread(fleet_config(fleet.handles)) as g:
            _models_known(g, big_len)
            assert _post(g, "completions", {"model": MODEL, "prompt": "warm up", "max_tokens": 2}).status_code == 200
            count = "kvgate_scheduler_seconds_count"
            before = metric_value(get_metrics(g.url), count, {"stage": "tokenize"})

            big_body = {"model": MODEL, "prompt": "hello world " * 850_000, "max_tokens": 2}  # 10.2 MB
            big_result: dict = {}

            def send_big() -> None:
                big_result["response"] = _post(g, "completions", big_body, timeout=120)

            t = threading.Thread(target=send_big)
            t.start()
            time.sleep(1.0)  # the body is uploaded and parsed in well under a second; tokenizing it takes seconds
            assert t.is_alive(), "the big request should still be tokenizing"
            short = _post(g, "completions", {"model": MODEL, "prompt": "a short one", "max_tokens": 2}, timeout=60)
            after_short = metric_value(get_metrics(g.url), count, {"stage": "tokenize"})
            big_still_in_flight = t.is_alive()
            pool = getattr(g.gateway.router, "pool", None)
            pending = pool.pending if pool is not None else 0
            t.join(120)

            assert short.status_code == 200, short.text
            assert big_still_in_flight, "the short request waited for the big one"
            assert after_short == before + 1, "the big prompt's tokenization had finished before the short request was answered"
            assert pending == 1, "the big prompt is being tokenized in the pool"
            big = big_result["response"]
            assert big.status_code == 400
            err = _err(big)
            assert err["param"] == "input_tokens"
            assert err["message"].startswith(
                f"This model's maximum context length is {big_len} tokens. However, your prompt contains at least {big_len + 1} input tokens"
            )
    finally:
        fleet.stop()


# -- vLLM's length checks, answered by the gateway ------------------------------------------------


def test_prompt_beyond_the_character_bound_is_refused_without_tokenizing(gw):
    tok = gw.gateway.router.tokenizer_for(MODEL)
    bound = L * tok.max_chars_per_token
    misses = tok.misses
    text = "x" * (bound + 1)
    r = _post(gw, "completions", {"model": MODEL, "prompt": text, "max_tokens": 4})
    assert r.status_code == 400
    err = _err(r)
    assert err["param"] == "input_text"
    assert err["message"] == (
        f"This model's maximum context length is {L} tokens. However, your prompt contains {bound + 1} characters "
        f"(more than {bound} characters, which is the upper bound for {L} input tokens). Please reduce the length of the input prompt. "
        f"(parameter=input_text, value={bound + 1})"
    )
    assert tok.misses == misses  # refused on its length alone: never tokenized


def test_prompt_with_too_many_tokens_is_refused_with_vllms_message(gw):
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=MODEL, prompt="hello " * 9000, max_tokens=4)  # ~9000 tokens, well under the character bound
    err = e.value.body  # the SDK keeps the body's "error" object
    assert isinstance(err, dict) and e.value.param == "input_tokens"
    assert err["param"] == "input_tokens"
    assert err["message"] == (
        f"This model's maximum context length is {L} tokens. However, your prompt contains at least {L + 1} input tokens, "
        "which exceeds this limit even without any output tokens. Please reduce the length of the input prompt. "
        f"(parameter=input_tokens, value={L + 1})"
    )


def test_chat_with_too_many_tokens_is_refused(gw):
    r = _post(gw, "chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 9000}], "max_tokens": 4})
    assert r.status_code == 400
    err = _err(r)
    assert err["param"] == "input_tokens" and "at least 8193 input tokens" in err["message"]


@pytest.mark.parametrize(
    "n,qualifier",
    [(L + 1, "at least "), (L + 500, "")],  # vLLM's quirk: a count of exactly L+1 reads "at least"
)
def test_token_id_prompt_too_long(gw, n, qualifier):
    r = _post(gw, "completions", {"model": MODEL, "prompt": [5] * n, "max_tokens": 4})
    assert r.status_code == 400
    err = _err(r)
    assert err["param"] == "input_tokens"
    assert err["message"] == (
        f"This model's maximum context length is {L} tokens. However, your prompt contains {qualifier}{n} input tokens, "
        "which exceeds this limit even without any output tokens. Please reduce the length of the input prompt. "
        f"(parameter=input_tokens, value={n})"
    )


def test_max_tokens_beyond_max_model_len(gw):
    r = _post(gw, "completions", {"model": MODEL, "prompt": "hi", "max_tokens": L + 1})
    assert r.status_code == 400
    err = _err(r)
    assert err["param"] == "max_tokens"
    assert err["message"] == (
        f"max_tokens={L + 1} cannot be greater than max_model_len={L}. Please request fewer output tokens. (parameter=max_tokens, value={L + 1})"
    )
    r = _post(gw, "chat/completions", {"model": MODEL, "messages": USER, "max_completion_tokens": L + 1})
    assert r.status_code == 400 and _err(r)["param"] == "max_completion_tokens"


def test_prompt_filling_the_whole_context_leaves_no_output_token(gw):
    r = _post(gw, "completions", {"model": MODEL, "prompt": [5] * L, "max_tokens": 4})
    assert r.status_code == 400
    err = _err(r)
    assert err["param"] == "max_tokens"
    assert err["message"] == "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"


def test_prompt_that_fits_still_served(gw):
    r = _post(gw, "completions", {"model": MODEL, "prompt": "hello " * 2000, "max_tokens": 4})
    assert r.status_code == 200, r.text


# -- token-id prompts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt,message",
    [
        ([1, 2**32], f"Token id {2**32} is out of vocabulary"),
        ([[1, 2], [3, 2**40]], f"Token id {2**40} is out of vocabulary"),
        ([1, 2**70], f"Token id {2**70} is out of vocabulary"),
    ],
)
def test_token_ids_beyond_uint32(gw, prompt, message):
    r = _post(gw, "completions", {"model": MODEL, "prompt": prompt, "max_tokens": 2})
    assert r.status_code == 400, r.text
    err = _err(r)
    assert err["message"] == message and err["param"] is None


@pytest.mark.parametrize(
    "prompt",
    [[1, -3], [5] * 20 + [-3], [1, "a"], [1, [2]], [[1, "x"]], [[1], [-1]], ["a", 1], ["a", [1]], [[1], "a"], [[]]],
)
def test_malformed_prompts_are_400_not_500(gw, prompt):
    """Refused at the front door (its schema check) or, for what passes it (negative ids), by
    routing with vLLM's validation error; either way a 400 naming the prompt."""
    r = _post(gw, "completions", {"model": MODEL, "prompt": prompt, "max_tokens": 2})
    assert r.status_code == 400, r.text
    err = _err(r)
    assert err["param"].startswith(("prompt", "body.prompt")), err


def test_negative_token_id_is_vllms_validation_error(gw):
    r = _post(gw, "completions", {"model": MODEL, "prompt": [5] * 20 + [-3], "max_tokens": 2})
    assert r.status_code == 400, r.text
    err = _err(r)
    assert err["param"] == "body.prompt.20"
    assert err["message"] == (
        "1 validation error:\n  {'type': 'greater_than_equal', 'loc': 'body.prompt.20', 'msg': 'Input should be greater than or equal to 0', "
        "'input': '-3', 'ctx': {'ge': 0}}"
    )


def test_valid_token_ids_still_served(gw):
    r = _post(gw, "completions", {"model": MODEL, "prompt": [5, 6, 7, 8], "max_tokens": 2})
    assert r.status_code == 200, r.text


# -- request-supplied chat templates --------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {"chat_template": "{{ messages[0].content }}"},
        {"chat_template_kwargs": {"chat_template": "{{ 'ab ' * 1000000 }}"}},
    ],
)
def test_request_chat_template_refused_by_default(gw, extra):
    r = _post(gw, "chat/completions", {"model": MODEL, "messages": USER, "max_tokens": 2, **extra})
    assert r.status_code == 400
    err = _err(r)
    assert err["message"] == UNTRUSTED and err["param"] is None


def test_request_chat_template_allowed_with_the_knob(trusting_gw):
    c = openai.OpenAI(base_url=f"{trusting_gw.url}/v1", api_key="x", max_retries=0)
    tpl = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    out = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, extra_body={"chat_template": tpl})
    assert out.choices[0].message.content


@pytest.mark.parametrize(
    "template,words",
    [
        ("{{ 'ab ' * 1000000 }}", "100000 characters"),
        ("{% for i in range(100000) %}{{ 'abcdefgh' }}{% endfor %}", "100000 characters"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "1.0 s"),
        ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}", "1.0 s"),
    ],
)
def test_request_chat_template_render_is_capped(trusting_gw, template, words):
    t0 = time.monotonic()
    r = _post(trusting_gw, "chat/completions", {"model": MODEL, "messages": USER, "max_tokens": 2, "chat_template": template})
    assert r.status_code == 400, r.text
    assert words in _err(r)["message"]
    assert time.monotonic() - t0 < 10
    # and the gateway is fine afterwards
    assert _post(trusting_gw, "completions", {"model": MODEL, "prompt": "still there?", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize(
    "template,message",
    [
        ("{{ raise_exception('Only user and assistant roles are supported!') }}", "Only user and assistant roles are supported!"),
        ("{{ 1 // 0 }}", "integer division or modulo by zero"),
        ("{{ messages + 1 }}", 'can only concatenate list (not "int") to list'),
        ("{% for %}", "Expected an expression, got 'end of statement block'"),
    ],
)
def test_template_that_raises_is_a_400_with_its_reason(trusting_gw, template, message):
    r = _post(trusting_gw, "chat/completions", {"model": MODEL, "messages": USER, "max_tokens": 2, "chat_template_kwargs": {"chat_template": template}})
    assert r.status_code == 400, r.text
    err = _err(r)
    assert err["message"] == message and err["param"] is None


def test_chat_template_kwargs_holding_messages(gw):
    """vLLM hands the kwargs to the template's render next to its own ``messages``: a TypeError it
    answers with a 400 carrying Python's message."""
    r = _post(
        gw, "chat/completions", {"model": MODEL, "messages": USER, "max_tokens": 2, "chat_template_kwargs": {"messages": [{"role": "user", "content": "x"}]}}
    )
    assert r.status_code == 400, r.text
    err = _err(r)
    assert err["message"] == "jinja2.environment.Template.render() got multiple values for keyword argument 'messages'"
    assert err["param"] is None


def test_saturated_tokenizer_sheds_with_429(fleet):
    """One tokenizing thread, a backlog of one: while a (slow, trusted) request template holds it,
    the next request that needs the pool is refused at once with a 429 and Retry-After."""
    cfg = fleet_config(
        fleet.handles,
        models={MODEL: {"tokenizer": "demo", "trust_request_chat_template": True}},
        tokenize={"workers": 1, "max_pending": 1, "template_timeout_s": 2.0},
    )
    with GatewayThread(cfg) as g:
        _models_known(g, L)
        slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
        held: dict = {}
        t = threading.Thread(
            target=lambda: held.update(r=_post(g, "chat/completions", {"model": MODEL, "messages": USER, "max_tokens": 2, "chat_template": slow}))
        )
        t.start()
        deadline = time.monotonic() + 10
        while g.gateway.router.pool.pending == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        c = openai.OpenAI(base_url=f"{g.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=MODEL, prompt="a prompt long enough to need the pool " * 40, max_tokens=2)
        assert e.value.response.headers["retry-after"] == "1"
        assert e.value.code == "tokenizer_busy"
        # a body small enough to be tokenized inline does not need the pool
        assert c.completions.create(model=MODEL, prompt="tiny", max_tokens=2).choices
        t.join(30)
        assert held["r"].status_code == 400 and "longer than 2.0 s" in _err(held["r"])["message"]
        assert c.completions.create(model=MODEL, prompt="a prompt long enough to need the pool " * 40, max_tokens=2).choices
