"""vLLM 0.33's normalisation of a chat request, so the gateway renders the prompt a replica renders.

A chat template never sees the request as the client sent it. vLLM first validates the body
(pydantic: ``ChatCompletionRequest``), rebuilds every message (``parse_chat_messages``), turns
tools into its own model's dump, merges the request's fields into the template kwargs
(``build_chat_params`` + ``preprocess_chat``), and adjusts roles before transformers renders
(``safe_apply_chat_template``). Rendering the raw messages instead gives other text for the
same request — a null ``content`` even fails in most templates — so prefix matching silently
misses. The facts reproduced here, read from vLLM 0.33.0 and transformers 5.20 (and pinned by
``tests/kvindex/test_chat_goldens.py``, whose goldens vLLM's own code wrote):

* **content format.** vLLM inspects the template's AST: a template that loops over a message's
  ``content`` gets ``"openai"`` content (a list of ``{"type": "text", "text": ...}`` parts, a media
  part as ``{"type": "image"}`` etc.), any other ``"string"`` content (text parts joined with
  ``"\\n"``, empty ones dropped). ``content: null`` (what the openai SDK returns with a tool call)
  is no parts: ``""`` or ``[]``. Refusal, ``input_text``/``output_text`` and ``thinking`` parts
  are text; unknown keys of a text part stay on it (openai format).
* **messages** keep only what vLLM passes on: ``role``, ``content``, then for an assistant
  ``tool_calls``, ``reasoning`` and ``reasoning_content`` (``reasoning_content`` sent by the
  client is read as ``reasoning``), for a tool ``tool_call_id`` (and list content joined into a
  string), ``name``, ``task``, and for ``developer`` its ``tools``. Tool calls come out of
  pydantic as ``{"id", "function": {"arguments", "name", ...}, "type", ...}`` (declared keys first),
  their ``arguments`` JSON parsed into a dict (bad JSON or a non-object: ``{}``), and an empty
  ``tool_calls`` list is dropped.
* **tools** are ``ChatCompletionToolsParam.model_dump()``: ``{"type": "function", "function":
  {"name", "description", "parameters"[, "strict"][, "defer_loading"]}}`` — a missing
  description or parameters is ``null``, unknown keys are gone.
* **roles.** A template that never names ``"developer"`` gets developer turns as system turns,
  and then all system turns merged into one at the front (joined by a blank line).
* **kwargs.** The request's own ``add_generation_prompt``, ``continue_final_message``,
  ``documents`` and ``reasoning_effort`` override ``chat_template_kwargs``; ``reasoning_effort``
  also sets ``enable_thinking`` (false for ``"none"``) unless the kwargs do; null and ``"auto"``
  values are unset; kwargs ``tools`` replace the request's (as sent, not dumped).

What cannot be reproduced is said where it happens: media parts (the replica's processor expands
their placeholders into tokens the gateway cannot know) limit the prediction to the prompt's
text before the first message that carries media (``RenderedChat.prefix``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

ContentFormat = Literal["string", "openai"]


class ChatTemplateError(ValueError):
    """The chat could not be rendered (bad message shape, or the template raised); the message is
    what vLLM answers in its 400 for the same failure. (Re-exported by ``kvindex.tokenize``.)"""


class ChatMessageError(ChatTemplateError):
    """The messages are not a chat vLLM accepts (its 400 for the same request)."""


# -- content format: vLLM's detection on the template's AST ---------------------------------------


class _Generation(jinja2.ext.Extension):
    """Parses ``{% generation %}`` so such templates have an AST (only parsed, never rendered)."""

    tags = {"generation"}  # noqa: RUF012 - jinja2's Extension declares ``tags`` an instance-level set

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


_PARSE_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _Generation])


class _Undetectable(Exception):
    """vLLM's detection failed on this AST (it then falls back to "string")."""


def _unwrap(node: jinja2.nodes.Node) -> jinja2.nodes.Node:
    """A filtered, tested or sliced value still stands for (the elements of) that value."""
    while True:
        if isinstance(node, jinja2.nodes.Filter | jinja2.nodes.Test) and node.node is not None:
            node = node.node
        elif isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice):
            node = node.node
        else:
            return node


def _is_name(node: jinja2.nodes.Node, name: str) -> bool:
    """``node`` reads variable ``name`` (a dotted name such as ``ns.rest``: that attribute)."""
    if isinstance(node, jinja2.nodes.Name):
        return node.ctx == "load" and node.name == name
    if isinstance(node, jinja2.nodes.Getattr) and "." in name:
        base, _, attr = name.rpartition(".")
        return node.attr == attr and _is_name(node.node, base)
    return False


def _is_content_of(node: jinja2.nodes.Node, name: str) -> bool:
    """``node`` is ``name.content`` / ``name['content']`` (filtered or sliced)."""
    node = _unwrap(node)
    if isinstance(node, jinja2.nodes.Getitem):
        return isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == "content" and _is_name(node.node, name)
    if isinstance(node, jinja2.nodes.Getattr):
        return node.attr == "content" and _is_name(node.node, name)
    return False


def _dotted(node: jinja2.nodes.Node) -> str | None:
    if isinstance(node, jinja2.nodes.NSRef):
        return f"{node.name}.{node.attr}"
    attrs: list[str] = []
    while isinstance(node, jinja2.nodes.Getattr):
        attrs.append(node.attr)
        node = node.node
    if isinstance(node, jinja2.nodes.Name):
        return ".".join([node.name, *reversed(attrs)])
    return None


def _aliases(root: jinja2.nodes.Template, name: str) -> list[str]:
    """``name`` and every variable assigned from it (``set x = messages[1:]``, namespace
    attributes ``namespace(rest=messages)`` / ``set ns.rest = messages``), transitively."""
    found = [name]
    queue = [name]
    while queue:
        current = queue.pop(0)
        for assign in root.find_all(jinja2.nodes.Assign):
            target, value = assign.target, assign.node
            new: list[str] = []
            if isinstance(target, jinja2.nodes.Name) and _is_name(_unwrap(value), current):
                new.append(target.name)
            if isinstance(target, jinja2.nodes.Name) and isinstance(value, jinja2.nodes.Call) and _is_name(value.node, "namespace"):
                new += [f"{target.name}.{kw.key}" for kw in value.kwargs if _is_name(_unwrap(kw.value), current)]
            elif isinstance(target, jinja2.nodes.Getattr | jinja2.nodes.NSRef) and _is_name(_unwrap(value), current):
                dotted = _dotted(target)
                new += [dotted] if dotted is not None else []
            for n in new:
                if n not in found:
                    found.append(n)
                    queue.append(n)
    return found


def _loop_target(loop: jinja2.nodes.For) -> str:
    if not isinstance(loop.target, jinja2.nodes.Name):  # vLLM asserts a plain name here
        raise _Undetectable
    return loop.target.name


def _content_loops(root: jinja2.nodes.Template) -> Iterator[jinja2.nodes.For]:
    """Loops over a message's content, in the template's order."""
    messages = _aliases(root, "messages")
    message_vars = [_loop_target(loop) for loop in root.find_all(jinja2.nodes.For) if any(_is_name(_unwrap(loop.iter), m) for m in messages)]

    def content_arg(node: jinja2.nodes.Node) -> bool:
        return any(_is_content_of(node, v) for v in message_vars)

    # a macro whose parameter receives ``message.content`` loops over content under another name
    in_macro: set[int] = set()
    params_of_loop: dict[int, set[str]] = {}
    for macro in root.find_all(jinja2.nodes.Macro):
        names = {a.name for a in macro.args}
        receiving: set[str] = set()
        for call in root.find_all(jinja2.nodes.Call):
            if not (isinstance(call.node, jinja2.nodes.Name) and call.node.name == macro.name):
                continue
            receiving |= {macro.args[i].name for i, arg in enumerate(call.args) if i < len(macro.args) and content_arg(arg)}
            receiving |= {kw.key for kw in call.kwargs if kw.key in names and content_arg(kw.value)}
        for loop in macro.find_all(jinja2.nodes.For):
            in_macro.add(id(loop))
            if receiving:
                params_of_loop[id(loop)] = receiving
    for loop in root.find_all(jinja2.nodes.For):
        if content_arg(loop.iter):
            yield loop
        elif id(loop) in params_of_loop and isinstance(loop.iter, jinja2.nodes.Name) and loop.iter.name in params_of_loop[id(loop)]:
            yield loop
        elif id(loop) not in in_macro and isinstance(loop.iter, jinja2.nodes.Name) and loop.iter.name == "content":
            yield loop


@lru_cache(maxsize=64)
def detect_content_format(template: str) -> ContentFormat:
    """vLLM's ``--chat-template-content-format auto``: ``"openai"`` when the template loops over a
    message's content, else ``"string"`` (also when the template does not parse)."""
    try:
        root = _PARSE_ENV.parse(template)
    except Exception:
        return "string"
    try:
        for loop in _content_loops(root):
            _loop_target(loop)
            return "openai"
    except _Undetectable:
        return "string"
    return "string"


# -- tools -------------------------------------------------------------------------------------------


def request_tools(tools: Any) -> Any:
    """The request's ``tools`` as vLLM hands them to the template (its pydantic model's dump).
    Tools vLLM would refuse (no function name, not objects) are returned as sent: the replica
    answers 400 whatever the gateway predicts."""
    if not isinstance(tools, list):
        return tools
    out = []
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or tool.get("type", "function") != "function":
            return tools
        top_defer = tool.get("defer_loading")
        dumped: dict[str, Any] = {"name": fn["name"], "description": fn.get("description"), "parameters": fn.get("parameters")}
        if fn.get("strict") is not None:
            dumped["strict"] = fn["strict"]
        defer = fn.get("defer_loading") if fn.get("defer_loading") is not None else top_defer
        if defer is not None:
            dumped["defer_loading"] = defer
        entry: dict[str, Any] = {"type": "function", "function": dumped}
        if top_defer is not None:
            entry["defer_loading"] = top_defer
        out.append(entry)
    return out


# -- request fields -> template kwargs -------------------------------------------------------------

#: values vLLM's ``merge_kwargs`` treats as unset
_UNSET = (None, "auto")


@dataclass(frozen=True, slots=True)
class ChatRequestParams:
    """What a chat request gives ``apply_chat_template`` besides the messages (vLLM's ChatParams
    after ``with_defaults``), with the server's default kwargs empty."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: Any = None
    documents: Any = None
    #: everything else the template may read: the request's ``chat_template_kwargs`` (set
    #: values only), ``reasoning_effort``, ``enable_thinking``
    template_kwargs: dict[str, Any] = field(default_factory=dict)


def _unset(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v == "auto")


def request_params(body: Mapping[str, Any]) -> ChatRequestParams:
    """vLLM 0.33's merge of a chat body's fields into the template's arguments
    (``ChatCompletionRequest.build_chat_params`` then ``with_defaults({tools, tokenize})``)."""
    given = body.get("chat_template_kwargs")
    user: dict[str, Any] = dict(given) if isinstance(given, dict) else {}
    effort = body.get("reasoning_effort")
    own: dict[str, Any] = {
        "add_generation_prompt": body.get("add_generation_prompt", True),
        "continue_final_message": body.get("continue_final_message", False),
        "documents": body.get("documents"),
        "reasoning_effort": effort,
    }
    if effort is not None and "enable_thinking" not in user:
        own["enable_thinking"] = effort != "none"
    merged = user | {k: v for k, v in own.items() if not _unset(v)}
    tools = request_tools(body.get("tools"))
    kwargs = ({"tools": tools} if tools is not None else {}) | {k: v for k, v in merged.items() if not _unset(v)}
    kwargs.pop("chat_template", None)  # resolved by the caller (trust rules), never a template variable
    kwargs.pop("tokenize", None)
    return ChatRequestParams(
        add_generation_prompt=bool(kwargs.pop("add_generation_prompt", True)),
        continue_final_message=bool(kwargs.pop("continue_final_message", False)),
        tools=kwargs.pop("tools", None),
        documents=kwargs.pop("documents", None),
        template_kwargs=kwargs,
    )


# -- messages ----------------------------------------------------------------------------------------

#: part types vLLM reads as text, and the key holding their text
_TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal", "thinking": "thinking"}
#: media part types and the modality the template sees (openai format: ``{"type": modality}``)
_MEDIA_PARTS = {
    "image_url": "image",
    "input_image": "image",
    "image_pil": "image",
    "image_embeds": "image",
    "audio_url": "audio",
    "input_audio": "audio",
    "audio_embeds": "audio",
    "video_url": "video",
    "video_embeds": "video",
    "prompt_embeds": "prompt_embeds",
}
#: a part without ``type`` is recognised by one of these keys, in this order (vLLM's)
_UNTYPED_KEYS = (
    "image_url",
    "image_pil",
    "image_embeds",
    "audio_embeds",
    "video_embeds",
    "prompt_embeds",
    "audio_url",
    "input_audio",
    "video_url",
    "tool_reference",
)
#: the keys of the content-part types vLLM knows; any other key of a text part stays on it
_KNOWN_PART_KEYS = frozenset(
    {
        "audio_embeds",
        "audio_url",
        "closed",
        "data",
        "file",
        "image_embeds",
        "image_pil",
        "image_url",
        "input_audio",
        "name",
        "prompt_cache_breakpoint",
        "refusal",
        "text",
        "thinking",
        "type",
        "uuid",
        "video_embeds",
        "video_url",
    }
)
_SUPPORTED_TYPES = ", ".join(sorted({*_TEXT_PARTS, *_MEDIA_PARTS, "tool_reference"}))
_BILLING_HEADER = "x-anthropic-billing-header"

_TextPart = tuple[Literal["text"], Any, dict[str, Any]]
_Part = tuple[str, Any, dict[str, Any]]


def _extras(part: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in part.items() if k not in _KNOWN_PART_KEYS}


def _classify(part: Any) -> _Part | None:
    """(kind, value, extras) of one content part: kind is "text", "tool_reference" or a
    modality; None for a part vLLM skips (text that is null)."""
    if isinstance(part, str):
        return ("text", part, {})
    if not isinstance(part, Mapping):
        raise ChatMessageError("Missing 'type' field in multimodal part.")
    kind = part.get("type")
    if isinstance(kind, str) and part.get("uuid") is None and (kind in _TEXT_PARTS or kind in _MEDIA_PARTS or kind == "tool_reference"):
        if kind in _TEXT_PARTS:
            value = part.get(_TEXT_PARTS[kind])
            if value is None and kind in ("text", "refusal"):
                return None
            if value is not None and not isinstance(value, str):
                raise ChatMessageError(f"{kind} content part: Input should be a valid string")
            return ("text", value, _extras(part))
        if kind == "tool_reference":
            return ("tool_reference", part.get("name"), {})
        return (_MEDIA_PARTS[kind], None, _extras(part))
    if kind is None or part.get("uuid") is not None:
        for key in _UNTYPED_KEYS:
            if key in part and not (key == "audio_embeds" and kind == "video_embeds"):
                if key == "tool_reference":
                    return ("tool_reference", part.get("name"), {})
                return (_MEDIA_PARTS[key], None, _extras(part))
        raise ChatMessageError("Missing 'type' field in multimodal part.")
    if not isinstance(kind, str):
        raise ChatMessageError("Invalid 'type' field in multimodal part.")
    raise ChatMessageError(f"Unsupported chat content part type: {kind!r}. Supported types: {_SUPPORTED_TYPES}.")


def _strip_billing_header(parts: list[Any]) -> list[Any]:
    """vLLM drops the first line of a system text part that starts with Claude Code's
    per-request attribution header (it would defeat the prefix cache)."""
    out: list[Any] = []
    for part in parts:
        text = part if isinstance(part, str) else part.get("text") if isinstance(part, Mapping) and part.get("type") == "text" else None
        if not (isinstance(text, str) and text.startswith(_BILLING_HEADER)):
            out.append(part)
            continue
        rest = text.partition("\n")[2]
        if rest:
            out.append(rest if isinstance(part, str) else {**part, "text": rest})
    return out


def _content(role: str, content: Any, fmt: ContentFormat) -> tuple[Any, bool]:
    """A message's content as the template sees it, and whether it carries media."""
    if content is None:
        parts: list[Any] = []
    elif isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise ChatMessageError(f"{role} message content must be a string or a list of content parts")
    if role == "system":
        parts = _strip_billing_header(parts)
    media = False
    if fmt == "openai":
        wrapped: list[Any] = []
        for part in parts:
            got = _classify(part)
            if got is None:
                continue
            kind, value, extras = got
            if kind == "text":
                wrapped.append({"type": "text", "text": value, **extras})
            elif kind == "tool_reference":
                wrapped.append({"type": "tool_reference", "name": value})
            else:
                media = True
                wrapped.append({"type": kind, **extras})
        return wrapped, media
    texts: list[Any] = []
    for part in parts:
        got = _classify(part)
        if got is None:
            continue
        kind, value, _ = got
        if kind in ("text", "tool_reference"):
            if value:  # vLLM keeps only truthy results: empty text parts vanish
                texts.append(value)
        else:
            media = True  # the replica puts its model's placeholder first; the gateway cannot
    return "\n".join(texts), media


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    """One assistant tool call as pydantic validates it and vLLM then reshapes it."""
    if not isinstance(call, Mapping):
        raise ChatMessageError("assistant tool_calls entries must be objects.")
    fn = call.get("function")
    if call.get("type", "function") != "function" or not isinstance(fn, Mapping):
        raise ChatMessageError("chat completions only support assistant tool_calls of type 'function'.")
    for key, value in (("id", call.get("id")), ("function.name", fn.get("name")), ("function.arguments", fn.get("arguments"))):
        if not isinstance(value, str):
            raise ChatMessageError(f"{where}.{key}: {'Field required' if value is None else 'Input should be a valid string'}")
    if call.get("type") is None:
        raise ChatMessageError(f"{where}.type: Field required")
    arguments: Any = {}
    if fn["arguments"]:
        try:
            arguments = json.loads(fn["arguments"])
        except ValueError:  # vLLM: a malformed history turn must not fail every later request
            arguments = {}
        if not isinstance(arguments, dict):
            arguments = {}
    function = {"arguments": arguments, "name": fn["name"], **{k: v for k, v in fn.items() if k not in ("arguments", "name")}}
    return {"id": call["id"], "function": function, "type": "function", **{k: v for k, v in call.items() if k not in ("id", "function", "type")}}


@dataclass(slots=True)
class Conversation:
    """The messages a template receives, and the first of them that carries media (if any)."""

    messages: list[dict[str, Any]]
    first_media: int | None = None


def normalise_messages(messages: Any, fmt: ContentFormat) -> Conversation:
    """The request's messages as vLLM 0.33 hands them to the template (see the module doc).
    Raises ``ChatMessageError`` where vLLM answers 400."""
    if not isinstance(messages, list) or not messages:
        raise ChatMessageError("messages must be a non-empty list")
    out: list[dict[str, Any]] = []
    media_at: int | None = None
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ChatMessageError(f"messages[{i}] must be an object with a string role")
        role = m["role"]
        content, media = _content(role, m.get("content"), fmt)
        if media and media_at is None:
            media_at = len(out)
        msg: dict[str, Any] = {"role": role, "content": content}
        reasoning = m.get("reasoning")
        if reasoning is None:
            reasoning = m.get("reasoning_content")
        if role == "assistant":
            calls = m.get("tool_calls")
            if calls is not None:
                if not isinstance(calls, list):
                    raise ChatMessageError(f"messages[{i}].tool_calls must be a list")
                shaped = [_tool_call(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(calls)]
                if shaped:  # an empty list is dropped: the template takes its plain path
                    msg["tool_calls"] = shaped
            if reasoning is not None:
                msg["reasoning"] = reasoning
                msg["reasoning_content"] = reasoning
        elif role == "tool":
            if "tool_call_id" in m:
                msg["tool_call_id"] = m["tool_call_id"]
            if isinstance(content, list):  # openai format: text parts become one string
                if not any(isinstance(p, Mapping) and p.get("type") != "text" for p in content):
                    msg["content"] = "\n".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        if isinstance(m.get("task"), str):
            msg["task"] = m["task"]
        if role == "developer":
            msg["tools"] = m.get("tools")
        out.append(msg)
    return Conversation(out, media_at)


def developer_as_system(conv: Conversation, template: str) -> Conversation:
    """A template that never names the developer role gets developer turns as system turns,
    then every system turn merged into one first turn (vLLM's ``safe_apply_chat_template``)."""
    msgs = conv.messages
    if not any(m["role"] == "developer" for m in msgs) or '"developer"' in template or "'developer'" in template:
        return conv
    converted = []
    for m in msgs:
        if m["role"] == "developer":
            m = {k: v for k, v in m.items() if k != "tools"} | {"role": "system"}
        converted.append(m)
    texts: list[str] = []
    rest: list[dict[str, Any]] = []
    merge = False
    for i, m in enumerate(converted):
        if m["role"] != "system":
            rest.append(m)
            continue
        merge = merge or i > 0 or bool(texts)
        content = m.get("content", "")
        if isinstance(content, list):
            content = "\n".join(p["text"] if isinstance(p, Mapping) else p for p in content if (isinstance(p, Mapping) and "text" in p) or isinstance(p, str))
        if content:
            texts.append(content)
    first_media = conv.first_media
    if not merge:
        return Conversation(converted, first_media)
    merged = [{"role": "system", "content": "\n\n".join(texts)}, *rest]
    if first_media is not None:  # media in a merged system turn: nothing after the start is sure
        marked = msgs[first_media]
        first_media = next((j for j, m in enumerate(merged) if m is marked), 0)
    return Conversation(merged, first_media)
