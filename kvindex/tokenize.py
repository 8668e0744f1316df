"""Tokenize exactly as vLLM does, so the gateway's block keys match the replicas' cache.

vLLM's rules, reproduced here:
* completions: ``tokenizer(prompt, add_special_tokens=True)`` by default (the request may set
  ``add_special_tokens``); a token-id prompt is used as is;
* chat: normalise the request as vLLM does before any template sees it (``chat_messages``:
  content format detected on the template, null/list content, tool calls with parsed
  arguments, tools as vLLM's model dumps them, developer turns, the kwargs merge), render the
  model's chat template (transformers semantics: a sandboxed jinja2 environment with
  ``trim_blocks`` and ``lstrip_blocks``, ``raise_exception``, ``tojson``, ``strftime_now``, the
  special tokens of ``tokenizer_config.json`` as variables, ``continue_final_message`` cut at a
  marker), then tokenize the text with ``add_special_tokens=False`` (the template already placed
  them); ``chat_template_kwargs`` reach the template as vLLM passes them
  (``resolve_template_kwargs``); a template that raises is a ``ChatTemplateError`` carrying the
  template's own reason. ``tests/kvindex/test_chat_goldens.py`` holds this to vLLM 0.33's own
  token ids.

The gateway calls this on every request, off its event loop (``TokenizePool``: a few threads,
a bounded backlog; HF ``tokenizers`` releases the GIL in ``encode_batch_fast``, not in
``encode``). ``CachingTokenizer`` keeps an LRU of recent prompts and rendered chats bounded by
bytes; a prompt longer than a limit is counted, never materialised (``PromptTooLong``).
A chat template supplied by the request is untrusted code: ``TemplateSandbox`` renders it in a
separate process that is killed past a time limit, capped in memory and in output size.
When no tokenizer is configured, ``remote_tokenize`` asks a replica's ``/tokenize`` instead (a
remote call on the hot path, hence only a fallback).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import multiprocessing
import re
import threading
import weakref
from array import array
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import httpx
import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import msgspec
import xxhash
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .chat_messages import (
    ChatTemplateError,
    Conversation,
    detect_content_format,
    developer_as_system,
    normalise_messages,
    request_params,
)
from .demo_tokenizer import build_demo_tokenizer

T = TypeVar("T")


class TemplateLimitError(ChatTemplateError):
    """A request-supplied chat template went past a render limit (time, output size, memory)."""


class TokenizerLoadError(ValueError):
    """No tokenizer could be loaded from the given spec."""


class PromptTooLong(ValueError):
    """The prompt has more tokens than allowed. ``tokens`` counts them as vLLM reports it: a text
    prompt is tokenized with truncation at ``limit + 1``, so the count is at most that."""

    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(f"prompt has {tokens} tokens, more than {limit}")
        self.tokens = tokens
        self.limit = limit


class TextTooLong(ValueError):
    """The (rendered) prompt text is longer than any tokenization within the limit could be."""

    def __init__(self, chars: int, limit: int) -> None:
        super().__init__(f"prompt has {chars} characters, more than {limit}")
        self.chars = chars
        self.limit = limit


class OverBudget(Exception):
    """Raised by a ``budget``-bound encode when more text than the budget is not in the cache:
    the caller runs the job again, unbounded, in the tokenize pool."""


class PoolBusy(RuntimeError):
    """The tokenize pool's backlog is full; the caller should shed the request."""


#: vLLM's ChatTemplateResolutionError (transformers' wording) when no template can be found
NO_CHAT_TEMPLATE = (
    "As of transformers v4.44, default chat template is no longer allowed, so you must provide a chat template if the tokenizer does not define one."
)

#: the named parameters of transformers' ``apply_chat_template`` (vLLM 0.33 reads them from
#: ``PythonBackend.apply_chat_template``): a ``chat_template_kwargs`` key among them is consumed by
#: transformers (or overridden by the request's own field), never handed to the template
HF_APPLY_CHAT_TEMPLATE_PARAMS = frozenset(
    {
        "conversation",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "sanitize_control_tokens",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _raise(message: str) -> None:
    # transformers raises jinja2's TemplateError; vLLM answers 400 with its message alone
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


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox for request-supplied templates: ``*``, ``**`` and ``+`` refuse results beyond
    the output cap before computing them (one C-level operation could otherwise allocate
    gigabytes faster than any time check). Only used inside the ``TemplateSandbox`` process,
    whose time and memory limits catch everything else."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def __init__(self, max_chars: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_chars = max_chars

    def _too_big(self) -> TemplateLimitError:
        return TemplateLimitError(f"the chat template's result would exceed {self.max_chars} characters (tokenize.template_max_chars)")

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        sized = (str, list, tuple)
        if operator == "*":
            seq, n = (left, right) if isinstance(left, sized) else (right, left)
            if isinstance(seq, sized) and isinstance(n, int) and len(seq) * n > self.max_chars:
                raise self._too_big()
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > 4 * self.max_chars:
                raise self._too_big()
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1 and left.bit_length() * right > 4 * self.max_chars:
                raise self._too_big()
        elif operator == "+" and isinstance(left, sized) and isinstance(right, sized) and len(left) + len(right) > self.max_chars:
            raise self._too_big()
        return super().call_binop(context, operator, left, right)


def _new_env(max_chars: int | None = None) -> jinja2.Environment:
    kwargs: dict[str, Any] = {"trim_blocks": True, "lstrip_blocks": True, "extensions": ["jinja2.ext.loopcontrols", _GenerationTag]}
    env = _BoundedSandbox(max_chars, **kwargs) if max_chars is not None else ImmutableSandboxedEnvironment(**kwargs)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _from_string(env: jinja2.Environment, template: str) -> tuple[jinja2.Template, frozenset[str]]:
    """The compiled template and the variables it reads (vLLM filters kwargs by them)."""
    try:
        variables = frozenset(jinja2.meta.find_undeclared_variables(env.parse(template)))
        return env.from_string(template), variables
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(str(exc)) from None


@lru_cache(maxsize=32)
def _compile(template: str) -> tuple[jinja2.Template, frozenset[str]]:
    """A trusted (the model's own) template, compiled once."""
    return _from_string(_new_env(), template)


def resolve_template_kwargs(template_vars: frozenset[str], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The ``chat_template_kwargs`` the template sees, as vLLM 0.33 passes them.

    vLLM keeps a key the template reads (or one of transformers' own parameters, which
    transformers then consumes: ``HF_APPLY_CHAT_TEMPLATE_PARAMS``), drops the rest, and renders
    with ``render(messages=..., tools=..., documents=..., add_generation_prompt=..., **kwargs)``:
    a ``messages`` key the template reads therefore collides — a TypeError vLLM answers with a
    400 carrying Python's message, reproduced here."""
    out = {}
    for k, v in kwargs.items():
        if k in HF_APPLY_CHAT_TEMPLATE_PARAMS or k not in template_vars:
            continue
        if k == "messages":
            raise ChatTemplateError("jinja2.environment.Template.render() got multiple values for keyword argument 'messages'")
        out[k] = v
    return out


def _reason(exc: BaseException) -> str:
    """What vLLM answers when a template raises: the innermost jinja2 error's text, else the
    exception's own (``_template_error_reason``)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, jinja2.TemplateError | ChatTemplateError):
            return str(cur)
        cur = cur.__cause__ or cur.__context__
    return str(exc)


#: transformers appends this to the final message's text to find where it ends in the render
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


@dataclass(frozen=True, slots=True)
class RenderedChat:
    """A rendered chat. ``prefix`` is set when a message carries media: the render of the
    messages before the first such message. Only the tokens the two renders share are sure to
    be the replica's (it expands each media placeholder into tokens of its processor, and hashes
    those blocks with the media), so only those are a prediction."""

    text: str
    prefix: str | None = None


def _check_hf_flags(kwargs: Mapping[str, Any]) -> None:
    """transformers' refusals for flags that need a tokenized result (vLLM renders text)."""
    if kwargs.get("sanitize_control_tokens"):
        raise ChatTemplateError("`sanitize_control_tokens=True` requires `tokenize=True` and is not compatible with `return_assistant_tokens_mask=True`.")
    if kwargs.get("return_assistant_tokens_mask"):
        raise ChatTemplateError("`return_assistant_tokens_mask=True` requires `return_dict=True` and `tokenize=True`")


def _render_messages(
    compiled: jinja2.Template,
    template: str,
    messages: list[dict],
    variables: Mapping[str, Any],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool,
    tools: Any,
    documents: Any,
    max_chars: int | None,
) -> str:
    """transformers' ``render_jinja_template`` for one chat (the messages already normalised)."""
    final: Any = None
    if continue_final_message:
        if add_generation_prompt:
            raise ChatTemplateError(
                "continue_final_message and add_generation_prompt are not compatible. Use continue_final_message when you want the model to continue the final message, and add_generation_prompt when you want to add a header that will prompt it to start a new assistant message instead."
            )
        messages = copy.deepcopy(messages)
        final = messages[-1].get("content")
        if final is None:
            raise ChatTemplateError('continue_final_message is set but the final message has no "content" to continue!')
        if "content" not in template:
            raise ChatTemplateError('continue_final_message is set to "content" but this is not an accepted field in the chat_template')
        if isinstance(final, list | tuple):
            for block in reversed(final):
                if "text" in block:  # the last text block is the one continued
                    final = block["text"]
                    block["text"] = block["text"] + CONTINUE_TAG
                    break
            else:
                raise ChatTemplateError("continue_final_message is set but we could not find any text to continue in the final message!")
        else:
            messages[-1]["content"] = messages[-1]["content"] + CONTINUE_TAG
    kwargs = {"messages": messages, "tools": tools, "documents": documents, "add_generation_prompt": add_generation_prompt, **variables}
    if max_chars is None:
        text = compiled.render(**kwargs)
    else:
        parts: list[str] = []
        size = 0
        for piece in compiled.generate(**kwargs):
            size += len(piece)
            if size > max_chars:
                raise TemplateLimitError(f"the chat template's result exceeds {max_chars} characters (tokenize.template_max_chars)")
            parts.append(piece)
        text = "".join(parts)
    if continue_final_message:
        tag = CONTINUE_TAG.strip()
        if final.strip() not in text or tag not in text:
            raise ChatTemplateError(
                "continue_final_message is set but the final message does not appear in the chat after applying the chat template! This can happen if the chat template deletes portions of the final message. Please verify the chat template and final message in your chat to ensure they are compatible."
                f"Final message to continue: {final.strip()}\nRendered chat:\n{text}"
            )
        at = text.rindex(tag)
        # the template kept the marker's trailing space: cut there; else it trimmed the end
        text = text[:at] if text[at : at + len(CONTINUE_TAG)] == CONTINUE_TAG else text[:at].rstrip()
    return text


def render_chat_prompt(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list | None = None,
    documents: list | None = None,
    special: Mapping[str, Any] | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
    max_chars: int | None = None,
) -> RenderedChat:
    """Render the request's ``messages`` with ``template`` as vLLM 0.33 does: the messages
    normalised (``chat_messages``: content format detected on ``template``, tool calls,
    developer turns), then transformers' rendering.

    ``max_chars`` set: ``template`` is untrusted — compiled in the bounded sandbox (not cached)
    and rendered in pieces, refused as soon as the output passes ``max_chars``. Only the
    ``TemplateSandbox`` process calls it so (it adds the time and memory limits)."""
    if max_chars is None:
        compiled, template_vars = _compile(template)
    else:
        compiled, template_vars = _from_string(_new_env(max_chars), template)
    given = template_kwargs or {}
    _check_hf_flags(given)
    # transformers: the special tokens, overridden by the kwargs
    variables = {**(special or {}), **resolve_template_kwargs(template_vars, given)}
    render = functools.partial(_render_messages, compiled, template, tools=tools, documents=documents, max_chars=max_chars)
    try:
        # a body vLLM's validation refuses may hold anything (numbers for text...): a 400, never a 500
        conv: Conversation = developer_as_system(normalise_messages(messages, detect_content_format(template)), template)
        text = render(conv.messages, variables, add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message)
        prefix: str | None = None
        if conv.first_media is not None:
            try:  # the turns before the first media message; a template that needs more: no prediction
                prefix = (
                    render(conv.messages[: conv.first_media], variables, add_generation_prompt=False, continue_final_message=False) if conv.first_media else ""
                )
            except Exception:
                prefix = ""
    except (TemplateLimitError, MemoryError, ChatTemplateError):
        raise
    except Exception as exc:  # vLLM: whatever the template raises is the client's 400
        raise ChatTemplateError(_reason(exc)) from None
    return RenderedChat(text, prefix)


def render_chat(template: str, messages: list[dict], **kwargs: Any) -> str:
    """The rendered text of ``render_chat_prompt`` (same arguments)."""
    return render_chat_prompt(template, messages, **kwargs).text


#: see ``Tokenizer.encode``: a prompt longer than this many characters per allowed token is
#: probed on a prefix first (English averages ~4, code ~3, CJK ~1.5)
PROBE_CHARS_PER_TOKEN = 8
PROBE_MARGIN = 64
#: after encoding a text this long, freed memory is handed back to the OS (``release_memory``)
TRIM_AFTER_CHARS = 1 << 20


def release_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    A 10 MB prompt's encoding peaks near 1 GB (HF tokenizers keeps offsets, token strings and
    masks per token); once freed, glibc keeps most of it mapped in its per-thread arenas
    (measured: +180 to +850 MB of RSS left after one such prompt, 0 after the trim)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class Tokenizer:
    """An HF ``tokenizers`` tokenizer plus the chat template and special tokens of its model."""

    def __init__(self, backend: Any, config: dict[str, Any] | None = None, name: str = "") -> None:
        self._tok = backend
        self.config = config or {}
        self.name = name
        raw = self.config.get("chat_template")
        self.chat_template: str | None = raw if isinstance(raw, str) else None
        #: named templates (a list of ``{"name", "template"}`` in tokenizer_config.json, or
        #: ``additional_chat_templates/``): transformers picks ``tool_use`` for a request with
        #: tools, else ``default``
        self.chat_templates: dict[str, str] = {}
        if isinstance(raw, list):
            self.chat_templates = {
                t["name"]: t["template"] for t in raw if isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
            }
        elif isinstance(raw, dict):
            self.chat_templates = {k: v for k, v in raw.items() if isinstance(v, str)}
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.special = {k: _token_str(v) for k, v in self.config.items() if k.endswith("_token") and _token_str(v) is not None}
        self._max_chars_per_token: int | None = None

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
        extra = path / "additional_chat_templates"
        if extra.is_dir():
            named = {p.stem: p.read_text() for p in sorted(extra.glob("*.jinja"))}
            main = config.get("chat_template")
            config["chat_template"] = {"default": main, **named} if isinstance(main, str) else named
        return cls(backend, config, name=path.name)

    def template_for(self, tools: Any = None) -> str | None:
        """The model's template for a request (transformers' ``get_chat_template``): the single
        template, else the named ``tool_use`` one when the request has tools, else ``default``."""
        if self.chat_template is not None:
            return self.chat_template
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        return self.chat_templates.get("default")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def max_chars_per_token(self) -> int:
        """The longest token string in the vocabulary (vLLM's ``max_chars_per_token``): a text
        longer than ``n * max_chars_per_token`` cannot be ``n`` tokens or fewer."""
        if self._max_chars_per_token is None:
            self._max_chars_per_token = max(1, max((len(t) for t in self._tok.get_vocab(with_added_tokens=True)), default=1))
        return self._max_chars_per_token

    def _encoding(self, text: str, add_special_tokens: bool) -> Any:
        # ``encode_batch_fast`` releases the GIL while it works (``encode`` holds it throughout,
        # freezing every other thread); same ids, no character offsets
        return self._tok.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0]

    def encode(self, text: str, add_special_tokens: bool = True, max_tokens: int | None = None) -> list[int]:
        """The token ids of ``text``. ``max_tokens``: raise ``PromptTooLong`` (counting at most
        ``max_tokens + 1``, as vLLM's truncated tokenization does) instead of building the list.

        A text much longer than ``max_tokens`` tokens usually are is probed first: when its
        first ``PROBE_CHARS_PER_TOKEN * (max_tokens + 1)`` characters alone are well over the
        limit, so is the whole (tokens of a prefix are the whole's first tokens but for the
        last pre-token, hence the margin) — refused without the full encoding, which costs
        ~100 bytes per character at its peak (1 GB for 10 MB)."""
        try:
            if max_tokens is not None and len(text) > PROBE_CHARS_PER_TOKEN * (max_tokens + 1):
                # only the count outlives this line: the encoding is freed before any trim below
                if len(self._encoding(text[: PROBE_CHARS_PER_TOKEN * (max_tokens + 1)], add_special_tokens)) > max_tokens + PROBE_MARGIN:
                    raise PromptTooLong(max_tokens + 1, max_tokens)
            n, ids = self._count_and_ids(text, add_special_tokens, max_tokens)
            if ids is None:
                raise PromptTooLong(max_tokens + 1 if max_tokens is not None else n, max_tokens or 0)
            return ids
        finally:
            if len(text) >= TRIM_AFTER_CHARS:
                release_memory()

    def _count_and_ids(self, text: str, add_special_tokens: bool, max_tokens: int | None) -> tuple[int, list[int] | None]:
        """The token count, and the ids unless there are more than ``max_tokens``."""
        enc = self._encoding(text, add_special_tokens)
        n = len(enc)
        return n, (enc.ids if max_tokens is None or n <= max_tokens else None)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def splitter(self) -> SpecialSplitter | None:
        """How this tokenizer splits a text on its added tokens, when pieces encode alone exactly
        (checked once, on sample texts); None when they do not or it cannot be told."""
        return SpecialSplitter.for_tokenizer(self)

    def encode_pieces(self, pieces: list[str]) -> list[list[int]]:
        """Each piece's ids without special tokens, in one call (the GIL released meanwhile)."""
        return [e.ids for e in self._tok.encode_batch_fast(pieces, add_special_tokens=False)]

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def apply_chat_template(
        self,
        messages: list[dict],
        /,
        *,
        add_generation_prompt: bool = True,
        tools: list | None = None,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        documents: list | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render with ``chat_template`` (trusted: in this process) or the model's template, the
        way vLLM renders a request carrying these messages (``render_chat_prompt``)."""
        template = chat_template or self.template_for(tools)
        if not template:
            raise ChatTemplateError(NO_CHAT_TEMPLATE)
        return render_chat(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            documents=documents,
            special=self.special,
            template_kwargs=template_kwargs,
        )

    def encode_chat(self, messages: list[dict], /, **kwargs: Any) -> list[int]:
        return self.encode(self.apply_chat_template(messages, **kwargs), add_special_tokens=False)


# -- request-supplied templates: rendered in a separate process ------------------------------------


def _sandbox_main(conn: Connection, memory_bytes: int | None) -> None:
    """The render process: one job at a time from ``conn``, until the pipe closes."""
    if memory_bytes:
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        except (ImportError, ValueError, OSError):  # not on this platform: time and output caps still hold
            pass
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        try:
            whole = job.pop("whole", False)
            rendered = render_chat_prompt(**job)
            reply: tuple[str, Any] = ("ok", (rendered.text, rendered.prefix) if whole else rendered.text)
        except TemplateLimitError as exc:
            reply = ("limit", str(exc))
        except ChatTemplateError as exc:
            reply = ("error", str(exc))
        except MemoryError:
            reply = ("memory", "")
        except Exception as exc:
            reply = ("error", _reason(exc))
        try:
            conn.send(reply)
        except (OSError, ValueError):
            return
        del job, reply


class _Worker:
    __slots__ = ("conn", "proc")

    def __init__(self, ctx: Any, memory_bytes: int | None) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_sandbox_main, args=(child, memory_bytes), name="kvgate-template-sandbox", daemon=True)
        self.proc.start()
        child.close()

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.join(2)
        finally:
            self.conn.close()


class TemplateSandbox:
    """Renders request-supplied chat templates in separate processes (spawned once, reused).

    A template is code: a thread running it cannot be stopped, a process can. Each render is
    capped in time (the process is killed after ``timeout_s``), in output (``max_chars``, checked
    piece by piece, and ``*``/``**``/``+`` refuse oversize results up front) and in memory
    (``RLIMIT_AS`` of ``memory_bytes`` where the platform has it). ``render`` blocks: call it from
    a worker thread. At most one process per concurrent caller; idle ones wait for the next job.
    """

    def __init__(self, timeout_s: float = 1.0, max_chars: int = 1 << 20, memory_bytes: int | None = 1 << 30) -> None:
        self.timeout_s = timeout_s
        self.max_chars = max_chars
        self.memory_bytes = memory_bytes
        self._ctx = multiprocessing.get_context("spawn")  # never fork a process with threads and an event loop
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self.spawned = 0
        self.killed = 0
        weakref.finalize(self, TemplateSandbox._close_all, self._idle, self._lock)

    @staticmethod
    def _close_all(idle: list[_Worker], lock: threading.Lock) -> None:
        with lock:
            workers, idle[:] = list(idle), []
        for w in workers:
            w.kill()

    def close(self) -> None:
        self._close_all(self._idle, self._lock)

    def _take(self) -> _Worker:
        with self._lock:
            while self._idle:
                w = self._idle.pop()
                if w.proc.is_alive():
                    return w
                w.kill()
            self.spawned += 1
        return _Worker(self._ctx, self.memory_bytes)

    def render(self, template: str, messages: list[dict], **kwargs: Any) -> str:
        """``render_chat(template, messages, **kwargs)`` in a sandbox process, within the caps."""
        return self._run({"template": template, "messages": messages, "max_chars": self.max_chars, **kwargs})

    def render_prompt(self, template: str, messages: list[dict], **kwargs: Any) -> RenderedChat:
        """``render_chat_prompt(template, messages, **kwargs)`` in a sandbox process."""
        text, prefix = self._run({"template": template, "messages": messages, "max_chars": self.max_chars, "whole": True, **kwargs})
        return RenderedChat(text, prefix)

    def _run(self, job: dict[str, Any]) -> Any:
        w = self._take()
        try:
            w.conn.send(job)
            if not w.conn.poll(self.timeout_s):
                self.killed += 1
                w.kill()
                raise TemplateLimitError(f"rendering the chat template took longer than {self.timeout_s} s (tokenize.template_timeout_s)")
            status, payload = w.conn.recv()
        except (EOFError, OSError):  # the process died: most likely past its memory limit
            w.kill()
            raise TemplateLimitError(
                f"rendering the chat template failed: its process exited (memory limit {self.memory_bytes} bytes, tokenize.template_memory_bytes)"
            ) from None
        if status == "memory":  # its heap is past the limit; a fresh process starts clean
            w.kill()
            raise TemplateLimitError(f"rendering the chat template exceeded its memory limit of {self.memory_bytes} bytes (tokenize.template_memory_bytes)")
        with self._lock:
            self._idle.append(w)
        if status == "ok":
            return payload
        if status == "limit":
            raise TemplateLimitError(payload)
        raise ChatTemplateError(payload)


# -- the hot path: a byte-bounded cache and a bounded pool -------------------------------------------


@dataclass(frozen=True, slots=True)
class ChatOptions:
    """Everything besides the messages that changes a chat's tokens (vLLM's ChatParams, resolved)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    #: as the template receives them: ``for_request`` dumps a request's tools as vLLM does
    tools: list | None = None
    #: ``chat_template_kwargs`` as the request gave them (less vLLM's reserved keys)
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    #: a request-supplied template (untrusted: rendered in the ``TemplateSandbox``)
    chat_template: str | None = None
    add_special_tokens: bool = False
    #: transformers' ``documents`` (RAG templates)
    documents: list | None = None

    @classmethod
    def for_request(cls, body: Mapping[str, Any], chat_template: str | None = None) -> ChatOptions:
        """A chat request's options as vLLM 0.33 merges them (``chat_messages.request_params``):
        the request's own fields over ``chat_template_kwargs``, ``reasoning_effort`` and
        ``documents`` included, tools dumped as vLLM's model does. ``chat_template``: the
        request's own template, once its trust was checked (the caller's rule)."""
        p = request_params(body)
        return cls(
            add_generation_prompt=p.add_generation_prompt,
            continue_final_message=p.continue_final_message,
            tools=p.tools,
            template_kwargs=p.template_kwargs,
            chat_template=chat_template,
            add_special_tokens=bool(body.get("add_special_tokens", False)),
            documents=p.documents,
        )


#: bytes one cache entry costs besides its tokens (4 bytes each): the OrderedDict slot, the
#: 16-byte digest key, the array and entry tuple headers — measured with tracemalloc over 20k
#: entries: ≈ 260, rounded up
ENTRY_OVERHEAD = 300


def _trie_pattern(words: list[str]) -> str:
    """A regex matching any of ``words``, longest first, factored by common prefixes: a plain
    alternation of a vocabulary's ~1000 added tokens costs a try of each at every position of
    the text, a trie fails at the first character nearly everywhere."""
    trie: dict[str, Any] = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict[str, Any]) -> str:
        end = "" in node
        alts = [re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        if end:  # a word ends here: the longer ones are tried first (greedy), then the end
            return "(?:" + body + ")?" if len(alts) == 1 else body + "?"
        return body

    return emit(trie)


class SpecialSplitter:
    """Cuts a text where HF ``tokenizers`` cuts it first: at its added tokens.

    HF tokenizers extract added tokens (``<|im_start|>``, ``<|eot_id|>``, ...) before anything
    else and then normalise, pre-tokenize and encode every piece between them on its own. So a
    rendered chat's ids are its pieces' ids joined by the added tokens' ids, and a piece seen
    before (the system prompt, a document, every earlier turn of a conversation) need not be
    encoded again. Only added tokens matched on the raw text with no stripping or word rule are
    cut on; a tokenizer whose pieces do not encode alone exactly (a pre-tokenizer that treats
    the text's first piece apart, say) fails the check in ``for_tokenizer`` and is not split.
    """

    #: texts the check encodes whole and in pieces; {0} and {1} stand for two added tokens
    CHECK_TEXTS = (
        "{0}system\nYou are a helpful assistant.{1}\n{0}user\n  Hello, world!{1}\n{0}assistant\n",
        "{0} leading space{1}{0}\n\nnewlines then text {1} trailing {0}{0}x",
        "plain start {0}é café — 数字 123 {1}\t tab {0}",
    )

    def __init__(self, pattern: re.Pattern[str], ids: dict[str, int]) -> None:
        self.pattern = pattern
        self.ids = ids

    @classmethod
    def for_tokenizer(cls, tok: Tokenizer) -> SpecialSplitter | None:
        backend = tok._tok
        try:
            added = backend.get_added_tokens_decoder()
        except AttributeError:
            return None
        try:
            normalizer = backend.normalizer
            state = json.loads(normalizer.__getstate__()) if normalizer is not None else None
        except (AttributeError, TypeError, ValueError):
            return None
        # with no normalisation, tokens matched on the normalised text match on the raw text too
        identity = state is None or (state.get("type") == "Sequence" and not state.get("normalizers"))
        usable = {a.content: i for i, a in added.items() if a.content and not (a.lstrip or a.rstrip or a.single_word or (a.normalized and not identity))}
        if len(usable) != len(added) or not usable:
            return None  # some added token is matched another way: leave the split to HF
        names = sorted(usable, key=len, reverse=True)  # leftmost-longest, as HF's matcher
        splitter = cls(re.compile(_trie_pattern(names)), usable)
        # the check cuts on the tokens chats use most (the model's bos/eos/... if added), and on
        # one matched on normalised text if there is one
        chat = [t for t in tok.special.values() if t in usable] + names
        normalised = [a.content for a in added.values() if a.normalized and a.content in usable]
        pairs = [(chat[0], chat[1] if len(chat) > 1 else chat[0])] + ([(normalised[0], chat[0])] if normalised else [])
        for pair in pairs:
            for text in cls.CHECK_TEXTS:
                sample = text.format(*pair)
                if splitter.encode(sample, tok.encode_pieces) != backend.encode(sample, add_special_tokens=False).ids:
                    return None
        return splitter

    def split(self, text: str) -> list[str | int]:
        """The pieces of ``text`` (strings) and its added tokens (their ids), in order."""
        out: list[str | int] = []
        at = 0
        for m in self.pattern.finditer(text):
            if m.start() > at:
                out.append(text[at : m.start()])
            out.append(self.ids[m.group()])
            at = m.end()
        if at < len(text):
            out.append(text[at:])
        return out

    def encode(self, text: str, encode_pieces: Callable[[list[str]], list[list[int]]]) -> list[int]:
        parts = self.split(text)
        pieces = [p for p in parts if isinstance(p, str)]
        encoded = iter(encode_pieces(pieces) if pieces else [])
        ids: list[int] = []
        for p in parts:
            if isinstance(p, int):
                ids.append(p)
            else:
                ids.extend(next(encoded))
        return ids


#: pieces of a rendered chat shorter than this are not worth a cache entry (a lookup costs about
#: what encoding ~40 characters does)
PIECE_CACHE_MIN_CHARS = 64


#: a chat's cache key material: JSON with sorted keys (msgspec: ~4x json.dumps's speed, 14 against
#: 57 µs for a 10 KB document); request bodies are decoded JSON, so equal material means equal input
_CACHE_KEY_JSON = msgspec.json.Encoder(enc_hook=str, order="sorted").encode


def _digest(*parts: Any) -> bytes:
    h = xxhash.xxh3_128()
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass") if isinstance(p, str) else p)
        h.update(b"\x00")
    return h.digest()


class CachingTokenizer:
    """A Tokenizer with an LRU of recent prompts and rendered chats, bounded by bytes.

    Keys are 128-bit digests (a 10 MB prompt is not kept alive by its cache entry); token ids are
    stored packed, 4 bytes each. An entry larger than an eighth of the budget is not cached, so
    one huge prompt cannot flush the hot set. Thread-safe: the tokenize pool calls it from
    several threads.
    """

    def __init__(self, tokenizer: Tokenizer, max_bytes: int = 64 << 20, sandbox: TemplateSandbox | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_bytes = max_bytes
        self.sandbox = sandbox
        self._cache: OrderedDict[bytes, tuple[array, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def __len__(self) -> int:
        return len(self._cache)

    def _get(self, key: bytes) -> tuple[array, int] | None:
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                self._cache.move_to_end(key)
                self.hits += 1
            return entry

    def _put(self, key: bytes, ids: list[int], text_len: int) -> None:
        cost = 4 * len(ids) + ENTRY_OVERHEAD
        with self._lock:
            self.misses += 1
            if cost > self.max_bytes // 8 or key in self._cache:
                return
            self._cache[key] = (array("I", ids), text_len)
            self.nbytes += cost
            while self.nbytes > self.max_bytes:
                _, (old, _len) = self._cache.popitem(last=False)
                self.nbytes -= 4 * len(old) + ENTRY_OVERHEAD

    @staticmethod
    def _checked(entry: tuple[array, int], max_chars: int | None, max_tokens: int | None) -> list[int]:
        ids, text_len = entry
        if max_chars is not None and text_len > max_chars:
            raise TextTooLong(text_len, max_chars)
        if max_tokens is not None and len(ids) > max_tokens:
            raise PromptTooLong(max_tokens + 1, max_tokens)
        return ids.tolist()

    def encode(self, text: str, add_special_tokens: bool = True, max_tokens: int | None = None, *, budget: int | None = None) -> list[int]:
        """``budget``: at most this many characters are encoded here, else ``OverBudget``."""
        key = _digest("p", b"\x01" if add_special_tokens else b"\x00", text)
        entry = self._get(key)
        if entry is not None:
            return self._checked(entry, None, max_tokens)
        if budget is not None and len(text) > budget:
            raise OverBudget
        ids = self.tokenizer.encode(text, add_special_tokens, max_tokens)
        self._put(key, ids, len(text))
        return ids

    def encode_chat(self, messages: list[dict], /, **kwargs: Any) -> list[int]:
        """Same as ``Tokenizer.encode_chat`` (trusted templates only), cached."""
        template = kwargs.pop("chat_template", None)
        opts = ChatOptions(
            add_generation_prompt=kwargs.pop("add_generation_prompt", True),
            continue_final_message=kwargs.pop("continue_final_message", False),
            tools=kwargs.pop("tools", None),
            documents=kwargs.pop("documents", None),
            template_kwargs=kwargs,
        )
        return self.chat_tokens(messages, opts, trusted_template=template)

    def _encode_rendered(self, text: str, add_special_tokens: bool, max_tokens: int | None, budget: int | None) -> list[int]:
        """A rendered chat's ids, its pieces between added tokens taken from the cache when
        seen before (``SpecialSplitter``: the same ids as encoding it whole)."""
        splitter = self.tokenizer.splitter
        if splitter is None or add_special_tokens or (max_tokens is not None and len(text) > PROBE_CHARS_PER_TOKEN * (max_tokens + 1)):
            if budget is not None and len(text) > budget:
                raise OverBudget
            return self.tokenizer.encode(text, add_special_tokens, max_tokens)
        ids = splitter.encode(text, self._pieces if budget is None else functools.partial(self._pieces, budget=budget))
        if max_tokens is not None and len(ids) > max_tokens:
            raise PromptTooLong(max_tokens + 1, max_tokens)
        return ids

    def _pieces(self, pieces: list[str], budget: int | None = None) -> list[list[int]]:
        """Each piece's ids: cached ones from the LRU, the others encoded in one batch. Pieces
        shorter than ``PIECE_CACHE_MIN_CHARS`` are encoded every time (cheaper than a lookup).
        ``budget``: ``OverBudget`` when the pieces to encode pass that many characters."""
        out: list[list[int] | None] = [None] * len(pieces)
        missing: list[int] = []
        keys: list[bytes | None] = [None] * len(pieces)
        for i, piece in enumerate(pieces):
            if len(piece) < PIECE_CACHE_MIN_CHARS:
                missing.append(i)
                continue
            piece_key = keys[i] = _digest("s", piece)
            entry = self._get(piece_key)
            if entry is None:
                missing.append(i)
            else:
                out[i] = entry[0].tolist()
        if missing:
            if budget is not None and sum(len(pieces[i]) for i in missing) > budget:
                raise OverBudget
            fresh = self.tokenizer.encode_pieces([pieces[i] for i in missing])
            for i, ids in zip(missing, fresh, strict=True):
                out[i] = ids
                fresh_key = keys[i]
                if fresh_key is not None:
                    self._put(fresh_key, ids, len(pieces[i]))
        return out  # type: ignore[return-value]

    def chat_tokens(
        self,
        messages: list[dict],
        opts: ChatOptions,
        *,
        max_chars: int | None = None,
        max_tokens: int | None = None,
        trusted_template: str | None = None,
        budget: int | None = None,
    ) -> list[int]:
        """A chat's tokens: the template rendered (a request's own in the sandbox), then encoded.

        Raises ``ChatTemplateError`` (``TemplateLimitError`` past a sandbox cap), ``TextTooLong``
        when the rendered text is longer than ``max_chars``, ``PromptTooLong`` past ``max_tokens``,
        ``OverBudget`` when ``budget`` is set and more characters than it are not in the cache
        (the render costs little next to encoding: the caller, on the event loop, finds out here
        whether the rest is cheap enough to do there too).
        """
        template = opts.chat_template or trusted_template or self.tokenizer.template_for(opts.tools)
        if not template:
            raise ChatTemplateError(NO_CHAT_TEMPLATE)
        try:
            material: bytes | None = _CACHE_KEY_JSON(
                [messages, opts.add_generation_prompt, opts.continue_final_message, opts.tools, opts.template_kwargs, opts.add_special_tokens, opts.documents]
            )
        except (TypeError, ValueError, msgspec.EncodeError):
            material = None  # not JSON-like (bodies are decoded JSON, so only from a Python caller): not cached
        key = _digest("c", template, material) if material is not None else None
        entry = self._get(key) if key is not None else None
        if entry is not None:
            return self._checked(entry, max_chars, max_tokens)
        render_kwargs: dict[str, Any] = {
            "add_generation_prompt": opts.add_generation_prompt,
            "continue_final_message": opts.continue_final_message,
            "tools": opts.tools,
            "documents": opts.documents,
            "special": self.tokenizer.special,
            "template_kwargs": dict(opts.template_kwargs),
        }
        if opts.chat_template is not None:
            if budget is not None:
                raise OverBudget  # a request's own template renders in the sandbox, never inline
            if self.sandbox is None:
                raise ChatTemplateError("request chat templates are not enabled")
            rendered = self.sandbox.render_prompt(template, messages, **render_kwargs)
        else:
            rendered = render_chat_prompt(template, messages, **render_kwargs)
        text = rendered.text
        if max_chars is not None and len(text) > max_chars:
            raise TextTooLong(len(text), max_chars)
        if budget is not None and rendered.prefix and len(rendered.prefix) > budget:
            raise OverBudget
        ids = self._encode_rendered(text, opts.add_special_tokens, max_tokens, budget)
        if rendered.prefix is not None:
            # media: predict only the tokens before the first media message (RenderedChat)
            sure = self.tokenizer.encode(rendered.prefix, opts.add_special_tokens) if rendered.prefix else []
            n = 0
            for a, b in zip(ids, sure, strict=False):
                if a != b:
                    break
                n += 1
            ids = ids[:n]
        if key is not None:
            self._put(key, ids, len(text))
        return ids


class TokenizePool:
    """Runs tokenization off the event loop: ``workers`` threads and a bounded backlog.

    HF ``tokenizers`` releases the GIL while encoding (``encode_batch_fast``), so the loop keeps
    serving while a long prompt is tokenized. The backlog (jobs queued or running) is bounded by
    count and by the summed ``weight`` (the caller passes the request body's size) — past either,
    ``run`` raises ``PoolBusy`` at once; a job is always accepted when nothing is pending, so one
    request larger than the byte bound is still served. A job's slot is released when the job
    really ends: a cancelled caller stops waiting, but a running thread cannot be stopped.
    """

    def __init__(self, workers: int = 2, max_pending: int = 1024, max_pending_bytes: int = 32 << 20) -> None:
        self.workers = workers
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="kvgate-tokenize")
        self._lock = threading.Lock()
        self.pending = 0
        self.pending_bytes = 0
        self.refused = 0
        weakref.finalize(self, self._executor.shutdown, wait=False, cancel_futures=True)

    async def run(self, fn: Callable[..., T], *args: Any, weight: int = 0) -> T:
        with self._lock:
            if self.pending and (self.pending >= self.max_pending or self.pending_bytes + weight > self.max_pending_bytes):
                self.refused += 1
                raise PoolBusy(f"{self.pending} tokenization jobs ({self.pending_bytes} bytes) pending")
            self.pending += 1
            self.pending_bytes += weight
        try:
            fut = self._executor.submit(fn, *args)
        except BaseException:
            self._release(weight)
            raise
        fut.add_done_callback(lambda _f: self._release(weight))
        return await asyncio.wrap_future(fut)

    def _release(self, weight: int) -> None:
        with self._lock:
            self.pending -= 1
            self.pending_bytes -= weight

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


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
    chat_template: str | None = None,
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
        if chat_template is not None:  # a request's own template, trusted by the gateway's configuration
            body["chat_template"] = chat_template
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
    """A tokenizer from a directory path, or ``"demo"`` (the built-in small BPE, ChatML); its
    added-token splitter is checked here, at load, not on the first request."""
    if spec == "demo":
        tok = Tokenizer.from_dir(build_demo_tokenizer())
        tok.name = "demo"
    else:
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise TokenizerLoadError(f"tokenizer {spec!r}: not a directory with tokenizer.json, and not 'demo'")
        tok = Tokenizer.from_dir(path)
    _ = tok.splitter
    return tok
