"""The Responses API (``POST /v1/responses``) as the gateway needs it: checks, prompt, state.

vLLM 0.33 serves ``/v1/responses`` by turning the body into a chat: the ``instructions`` as a
system message, then the ``input`` (a string is one user message; a list of items becomes
messages: message items as they are, function calls folded into the preceding assistant
message, tool outputs as tool messages), rendered with the model's chat template. The gateway
builds the same messages here so the prefix it routes on is the prompt the replica will build
(the chat tokenizer in ``kvindex.tokenize`` does the rest, exactly as for chat).

Two things make responses different from chat on the wire:

- **State.** A replica keeps the responses it produced (with ``VLLM_ENABLE_RESPONSES_API_STORE``)
  in its own memory; a request naming ``previous_response_id`` only works on that replica.
  ``ResponseAffinity`` remembers which replica answered each response id, bounded in count and
  time; a miss is asked of the replicas (``GET /v1/responses/{id}``) before the request is
  routed like any other (where the replica answers vLLM's own 404 if nobody holds it).
- **Streaming.** Events are named (``event: response.created`` ...) and the stream ends with
  ``response.completed`` (or ``response.incomplete`` when ``max_output_tokens`` ran out),
  never with ``data: [DONE]``. The first two events come before any work (vLLM yields them
  before the engine's first output), so "the first byte of the answer" is the first event
  after them. ``StreamEnd`` tells a whole stream from a cut one without buffering it.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import msgspec

from .errors import bad_request

#: roles a message item may have (OpenAI's EasyInputMessage / Message item)
ROLES = frozenset({"user", "assistant", "system", "developer"})
#: vLLM's separator between a namespace tool's namespace and its function name
NAMESPACE_SEPARATOR = "__"
#: events that end a responses stream (vLLM ends with one of the first two; OpenAI may send the third)
TERMINAL_EVENTS = (b"response.completed", b"response.incomplete", b"response.failed")
#: events vLLM sends before the engine produced anything
PREAMBLE_EVENTS = (b"response.created", b"response.in_progress")


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def validate(body: Mapping[str, Any]) -> None:
    """The checks vLLM's ResponsesRequest makes that matter before routing (400 otherwise)."""
    if "input" not in body:
        raise bad_request("'input' is required", "input")
    inp = body["input"]
    if isinstance(inp, list):
        for i, item in enumerate(inp):
            _check_item(item, i)
    elif not isinstance(inp, str):
        raise bad_request("'input' must be a string or a list of input items", "input")
    for key in ("instructions", "previous_response_id"):
        v = body.get(key)
        if v is not None and not isinstance(v, str):
            raise bad_request(f"'{key}' must be a string", key)
    if body.get("previous_response_id") == "":
        raise bad_request("'previous_response_id' must not be empty", "previous_response_id")
    v = body.get("max_output_tokens")
    if v is not None and not _positive_int(v):
        raise bad_request("'max_output_tokens' must be a positive integer", "max_output_tokens")
    for key in ("store", "background"):
        v = body.get(key)
        if v is not None and not isinstance(v, bool):
            raise bad_request(f"'{key}' must be a boolean", key)
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("type"), str) for t in tools):
            raise bad_request("'tools' must be a list of objects with a string 'type'", "tools")
    # vLLM's model validators, word for word
    if body.get("background") and body.get("store") is False:
        raise bad_request("background can only be used when `store` is true", "background")
    if body.get("prompt") is not None:
        raise bad_request("prompt template is not supported", "prompt")
    if body.get("tool_choice") == "required" and not tools:
        raise bad_request("Tool choice 'required' must be specified with 'tools' parameter.", "tool_choice")
    if body.get("previous_input_messages") and body.get("previous_response_id"):
        raise bad_request("Only one of `previous_input_messages` and `previous_response_id` can be set.", "previous_response_id")


def _check_item(item: Any, i: int) -> None:
    where = f"input[{i}]"
    if not isinstance(item, dict):
        raise bad_request(f"{where} must be an object (a message with a role, or an item with a type)", where)
    if "role" in item and item.get("type", "message") == "message":
        if item["role"] not in ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(sorted(ROLES))}", f"{where}.role")
        content = item.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and isinstance(p.get("type"), str) for p in content):
                raise bad_request(f"{where}.content parts must be objects with a string 'type'", f"{where}.content")
        elif not isinstance(content, str):
            raise bad_request(f"{where}.content must be a string or a list of content parts", f"{where}.content")
        return
    if not isinstance(item.get("type"), str):
        raise bad_request(f"{where} must be a message (with a role) or an item with a string 'type'", where)


# -- the chat vLLM builds from a responses body ----------------------------------------------------


def _text_of(content: Any) -> str | None:
    """An output message's text as vLLM reads it: the first part's ``text``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and isinstance(content[0], dict):
        text = content[0].get("text")
        return text if isinstance(text, str) else None
    return None


def _merge_into_assistant(msgs: list[dict[str, Any]], key: str, value: Any) -> bool:
    """Fill ``key`` of the preceding assistant message if it has none (vLLM folds consecutive
    assistant items into one message); False when a new message is needed."""
    prev = msgs[-1] if msgs else None
    if prev is None or prev.get("role") != "assistant":
        return False
    if key == "tool_calls":
        if prev.get("tool_calls") is None:
            prev["tool_calls"] = [value]
        else:
            prev["tool_calls"].append(value)
        return True
    if prev.get(key) is None:
        prev[key] = value
        return True
    return False


def _append_item(msgs: list[dict[str, Any]], item: dict[str, Any]) -> None:
    kind = item.get("type")
    if kind in ("function_call", "custom_tool_call"):
        name = item.get("name")
        if kind == "function_call" and item.get("namespace"):
            name = f"{item['namespace']}{NAMESPACE_SEPARATOR}{name}"
        args = item.get("arguments") if kind == "function_call" else json.dumps({"input": item.get("input") or ""}, ensure_ascii=False)
        call = {"id": item.get("call_id"), "function": {"name": name, "arguments": args}, "type": "function"}
        if not _merge_into_assistant(msgs, "tool_calls", call):
            msgs.append({"role": "assistant", "tool_calls": [call]})
        return
    if kind == "reasoning":
        if item.get("encrypted_content"):
            raise bad_request("Encrypted content is not supported.", "input")
        parts = item.get("content") or item.get("summary") or []
        text = _text_of(parts) or ""
        if not _merge_into_assistant(msgs, "reasoning", text):
            msgs.append({"role": "assistant", "reasoning": text})
        return
    if kind in ("function_call_output", "custom_tool_call_output"):
        msgs.append({"role": "tool", "content": item.get("output"), "tool_call_id": item.get("call_id")})
        return
    if item.get("role") == "assistant":
        said = _text_of(item.get("content"))
        if said is not None:
            if not _merge_into_assistant(msgs, "content", said):
                msgs.append({"role": "assistant", "content": said})
            return
    if "role" in item:
        msgs.append(item)
        return
    raise bad_request(f"Unsupported input item type: {kind}", "input")


def input_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The chat messages vLLM renders for this body (without any stored history)."""
    msgs: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions:
        msgs.append({"role": "system", "content": instructions})
    inp = body.get("input")
    if isinstance(inp, str):
        msgs.append({"role": "user", "content": inp})
    elif isinstance(inp, list):
        for item in inp:
            _append_item(msgs, dict(item))
    return msgs


def continues_final_message(body: Mapping[str, Any]) -> bool:
    """A last input item that is a message or reasoning still in progress is continued, not answered."""
    inp = body.get("input")
    if not isinstance(inp, list) or not inp or not isinstance(inp[-1], dict):
        return False
    last = inp[-1]
    return last.get("type", "message") in ("message", "reasoning") and last.get("status") in ("in_progress", "incomplete")


def chat_tools(body: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The request's function tools as the chat template sees them (namespaces flattened)."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    out: list[dict[str, Any]] = []

    def add(tool: Mapping[str, Any], name: Any) -> None:
        fn = {"name": name, "description": tool.get("description"), "parameters": tool.get("parameters"), "strict": tool.get("strict")}
        out.append({"type": "function", "function": fn})

    for tool in tools:
        if tool.get("type") == "function":
            add(tool, tool.get("name"))
        elif tool.get("type") == "namespace" and isinstance(tool.get("tools"), list):
            for sub in tool["tools"]:
                if isinstance(sub, dict) and sub.get("type") == "function":
                    add(sub, f"{tool.get('name')}{NAMESPACE_SEPARATOR}{sub.get('name')}")
    return out or None


def chat_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """A chat-completions body that renders to the prompt vLLM builds for this responses body:
    messages, tools, and the template kwargs (the request's ``chat_template_kwargs`` under the
    generation-prompt flags and the reasoning effort, as vLLM's ``build_chat_params``)."""
    cont = continues_final_message(body)
    given = body.get("chat_template_kwargs")
    kwargs: dict[str, Any] = dict(given) if isinstance(given, dict) else {}
    reasoning = body.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    if effort is not None and effort != "auto":
        kwargs["reasoning_effort"] = effort
        if "enable_thinking" not in (given or {}):
            kwargs["enable_thinking"] = effort != "none"
    out: dict[str, Any] = {
        "model": body.get("model"),
        "messages": input_messages(body),
        "add_generation_prompt": not cont,
        "continue_final_message": cont,
        "chat_template_kwargs": kwargs,
    }
    tools = chat_tools(body)
    if tools is not None:
        out["tools"] = tools
    if isinstance(body.get("cache_salt"), str):
        out["cache_salt"] = body["cache_salt"]
    return out


def prompt_too_long(count: int, max_len: int, at_least: bool = False) -> Exception:
    """vLLM's responses-path refusal of a prompt that leaves no room in the context."""
    n = f"at least {count}" if at_least else str(count)
    return bad_request(f"The engine prompt length {n} exceeds the max_model_len {max_len}. Please reduce prompt.", "input")


# -- which replica holds which response -------------------------------------------------------------


class ResponseAffinity:
    """Response id → the replica that produced it, for ``previous_response_id``.

    Bounded twice: at most ``max_entries`` ids (least recently used dropped first) and each for
    ``ttl_s`` after it was last seen. vLLM never evicts a stored response, so the bound is the
    gateway's memory, not the replica's; an id forgotten here is looked for on the replicas.
    """

    def __init__(self, max_entries: int = 65536, ttl_s: float = 6 * 3600.0) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._ids: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def remember(self, response_id: str, replica: str) -> None:
        self._ids[response_id] = (replica, time.monotonic() + self.ttl_s)
        self._ids.move_to_end(response_id)
        while len(self._ids) > self.max_entries:
            self._ids.popitem(last=False)

    def holder(self, response_id: str) -> str | None:
        entry = self._ids.get(response_id)
        if entry is None:
            return None
        replica, expires = entry
        if time.monotonic() > expires:
            del self._ids[response_id]
            return None
        self._ids.move_to_end(response_id)
        return replica


class _Id(msgspec.Struct):
    id: str = ""


class _Event(msgspec.Struct):
    response: _Id | None = None


_ID = msgspec.json.Decoder(_Id)
_EVENT = msgspec.json.Decoder(_Event)


def response_id(content: bytes) -> str | None:
    """The ``id`` of a non-streamed response body (None if it is not one)."""
    try:
        return _ID.decode(content).id or None
    except msgspec.DecodeError:
        return None


def stream_response_id(preamble: bytes) -> str | None:
    """The response id carried by the first event of a stream (``response.created``)."""
    start = preamble.find(b"data: ")
    if start < 0:
        return None
    end = preamble.find(b"\n", start)
    line = preamble[start + 6 : end if end >= 0 else len(preamble)]
    try:
        event = _EVENT.decode(line)
    except msgspec.DecodeError:
        return None
    return event.response.id or None if event.response is not None else None


def _event_names(buf: bytes) -> list[bytes]:
    """The ``event:`` names in ``buf`` (lines that start an SSE event; JSON data has no raw newline)."""
    names = []
    pos = 0 if buf.startswith(b"event: ") else buf.find(b"\nevent: ")
    while pos >= 0:
        start = pos + (7 if pos == 0 and buf.startswith(b"event: ") else 8)
        end = buf.find(b"\n", start)
        if end < 0:
            break
        names.append(buf[start:end].strip())
        pos = buf.find(b"\nevent: ", end)
    return names


def past_preamble(buf: bytes) -> bool:
    """Whether ``buf`` (the stream so far) holds an event beyond vLLM's created/in-progress pair,
    i.e. the engine has produced something: the stream's real first byte."""
    return any(name not in PREAMBLE_EVENTS for name in _event_names(buf))


class StreamEnd:
    """Watches a relayed responses stream for its terminal event, chunk by chunk, keeping only
    a short tail (an event line may be split between two chunks)."""

    __slots__ = ("_tail", "seen")

    TAIL = 48

    def __init__(self) -> None:
        self._tail = b""
        self.seen = False

    def feed(self, chunk: bytes) -> None:
        window = self._tail + chunk
        if b"event: response." in window:
            for name in TERMINAL_EVENTS:
                if b"event: " + name + b"\n" in window:
                    self.seen = True
        self._tail = window[-self.TAIL :]

    def whole(self) -> bool:
        """The terminal event arrived and its data is complete (what was fed ends an event:
        the kept tail, since a chunk may be as short as one byte)."""
        return self.seen and self._tail.endswith(b"\n\n")
