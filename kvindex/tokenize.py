"""Tokenize exactly as vLLM does, so the gateway's block keys match the replicas' cache.

vLLM's rules, reproduced here:
* completions: ``tokenizer(prompt, add_special_tokens=True)`` by default (the request may set
  ``add_special_tokens``); a token-id prompt is used as is;
* chat: render the model's chat template (transformers semantics: a sandboxed jinja2
  environment with ``trim_blocks`` and ``lstrip_blocks``, ``raise_exception``, ``tojson``,
  ``strftime_now``, the special tokens of ``tokenizer_config.json`` as variables), then
  tokenize the text with ``add_special_tokens=False`` (the template already placed them).

The gateway calls this on every request, so ``CachingTokenizer`` keeps a bounded LRU of
recent prompts and rendered chats; when no tokenizer is configured, ``remote_tokenize`` asks a
replica's ``/tokenize`` instead (a remote call on the hot path, hence only a fallback).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx
import jinja2
import jinja2.ext
import jinja2.nodes
import xxhash
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .demo_tokenizer import build_demo_tokenizer


class ChatTemplateError(ValueError):
    """The chat could not be rendered (bad message shape, or the template raised)."""


class TokenizerLoadError(ValueError):
    """No tokenizer could be loaded from the given spec."""


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    """transformers' ``tojson`` filter (not jinja2's, which HTML-escapes)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker): when
    only rendering text it is a no-op around its body, so templates that use it compile."""

    tags = {"generation"}  # noqa: RUF012 - jinja2's Extension declares ``tags`` an instance-level set; a ClassVar would clash

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from None


class Tokenizer:
    """An HF ``tokenizers`` tokenizer plus the chat template and special tokens of its model."""

    def __init__(self, backend: Any, config: dict[str, Any] | None = None, name: str = "") -> None:
        self._tok = backend
        self.config = config or {}
        self.name = name
        self.chat_template: str | None = self.config.get("chat_template") if isinstance(self.config.get("chat_template"), str) else None
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self._special = {k: _token_str(v) for k, v in self.config.items() if k.endswith("_token") and _token_str(v) is not None}

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        # deferred for start-up cost: the ``tokenizers`` extension is needed only once a tokenizer is loaded
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerLoadError(f"no tokenizer.json in {path}")
        backend = HFTokenizer.from_file(str(tj))
        config: dict[str, Any] = {}
        tc = path / "tokenizer_config.json"
        if tc.is_file():
            config = json.loads(tc.read_text())
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            config["chat_template"] = jinja_file.read_text()
        return cls(backend, config, name=path.name)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        tools: list | None = None,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> str:
        template = chat_template or self.chat_template
        if not template:
            raise ChatTemplateError("this model has no chat template; use /v1/completions or pass chat_template")
        _check_messages(messages)
        variables = {**self._special, **template_kwargs}
        try:
            text = _compile(template).render(
                messages=messages, add_generation_prompt=add_generation_prompt and not continue_final_message, tools=tools, **variables
            )
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError, KeyError, AttributeError, IndexError) as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from None
        if continue_final_message:
            final = messages[-1].get("content")
            final_text = final if isinstance(final, str) else "".join(p.get("text", "") for p in final or [] if isinstance(p, dict))
            idx = text.rfind(final_text) if final_text else -1
            if idx >= 0:
                text = text[: idx + len(final_text)]
        return text

    def encode_chat(self, messages: list[dict], **kwargs: Any) -> list[int]:
        return self.encode(self.apply_chat_template(messages, **kwargs), add_special_tokens=False)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ChatTemplateError(f"messages[{i}] must be an object with a string role")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ChatTemplateError(f"messages[{i}].content must be a string or a list of parts")


class CachingTokenizer:
    """A Tokenizer with bounded LRU caches for prompts and rendered chats (the hot path)."""

    def __init__(self, tokenizer: Tokenizer, max_entries: int = 4096) -> None:
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self._cache: OrderedDict[tuple, list[int]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def _get(self, key: tuple) -> list[int] | None:
        ids = self._cache.get(key)
        if ids is not None:
            self._cache.move_to_end(key)
            self.hits += 1
        return ids

    def _put(self, key: tuple, ids: list[int]) -> list[int]:
        self.misses += 1
        self._cache[key] = ids
        if len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        key = ("p", text, add_special_tokens)
        ids = self._get(key)
        return ids if ids is not None else self._put(key, self.tokenizer.encode(text, add_special_tokens))

    def encode_chat(self, messages: list[dict], **kwargs: Any) -> list[int]:
        try:
            digest = xxhash.xxh3_128_hexdigest(json.dumps([messages, kwargs], sort_keys=True, separators=(",", ":"), default=str).encode())
        except (TypeError, ValueError):
            return self.tokenizer.encode_chat(messages, **kwargs)
        key = ("c", digest)
        ids = self._get(key)
        return ids if ids is not None else self._put(key, self.tokenizer.encode_chat(messages, **kwargs))


async def remote_tokenize(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    *,
    prompt: str | None = None,
    messages: list | None = None,
    add_special_tokens: bool | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list | None = None,
    chat_template_kwargs: dict | None = None,
    timeout: float = 2.0,  # noqa: ASYNC109 - httpx's per-request timeout (connect/read), passed on, not a coroutine deadline
    api_key: str | None = None,
) -> list[int]:
    """Ask a replica's ``POST /tokenize`` (vLLM's JSON) for the tokens of a prompt or chat.

    For a chat, everything that changes the rendered template (tools, template kwargs,
    continue_final_message) goes along, so the tokens are the ones the replica will see.
    ``api_key``: the replica's own key, sent as a bearer token. vLLM builds that derive the
    guarded routes from the route table protect /tokenize too; older ones leave it open and
    the header does no harm."""
    body: dict[str, Any] = {"model": model}
    if messages is not None:
        body["messages"] = messages
        body["add_generation_prompt"] = add_generation_prompt
        body["add_special_tokens"] = False if add_special_tokens is None else add_special_tokens
        if continue_final_message:
            body["continue_final_message"] = True
        if tools is not None:
            body["tools"] = tools
        if chat_template_kwargs:
            body["chat_template_kwargs"] = chat_template_kwargs
    else:
        body["prompt"] = prompt or ""
        body["add_special_tokens"] = True if add_special_tokens is None else add_special_tokens
    headers = {"authorization": f"Bearer {api_key}"} if api_key else None
    resp = await client.post(f"{base_url.rstrip('/')}/tokenize", json=body, headers=headers, timeout=timeout)
    resp.raise_for_status()
    tokens = resp.json()["tokens"]
    if not isinstance(tokens, list):
        raise ValueError("/tokenize answered without a token list")
    return [int(t) for t in tokens]


@lru_cache(maxsize=16)
def load_tokenizer(spec: str) -> Tokenizer:
    """A tokenizer from a directory path, or ``"demo"`` (the built-in small BPE, ChatML)."""
    if spec == "demo":
        tok = Tokenizer.from_dir(build_demo_tokenizer())
        tok.name = "demo"
        return tok
    path = Path(spec).expanduser()
    if path.is_dir():
        return Tokenizer.from_dir(path)
    raise TokenizerLoadError(f"tokenizer {spec!r}: not a directory with tokenizer.json, and not 'demo'")
