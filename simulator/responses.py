"""The shapes of vLLM 0.33's Responses API (``/v1/responses``) for the simulated replica.

vLLM turns a responses body into a chat (``instructions`` as the system message, stored
history, then the input items as messages), generates, and answers with a ``response`` object
or a stream of named SSE events: ``response.created``, ``response.in_progress``, then for the
text ``response.output_item.added``, ``response.content_part.added``, one
``response.output_text.delta`` per engine output, ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done``, and last
``response.completed`` (``response.incomplete`` when ``max_output_tokens`` cut it). Every
event carries a ``sequence_number`` from 0; there is no ``data: [DONE]``.

Kept separate from the gateway's reading of the same format on purpose: the simulator stands
in for vLLM, so the gateway's tests check the gateway against an independent implementation.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import msgspec

#: vLLM's separator between a namespace tool's namespace and its function name
NAMESPACE_SEPARATOR = "__"


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _first_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and isinstance(content[0], dict):
        text = content[0].get("text")
        return text if isinstance(text, str) else None
    return None


def _fold(msgs: list[dict], key: str, value: Any) -> bool:
    """vLLM folds an assistant item into the assistant message just before it when that
    message lacks the field; True if it did."""
    if not msgs or msgs[-1].get("role") != "assistant":
        return False
    prev = msgs[-1]
    if key == "tool_calls":
        prev.setdefault("tool_calls", None)
        if prev["tool_calls"] is None:
            prev["tool_calls"] = []
        prev["tool_calls"].append(value)
        return True
    if prev.get(key) is None:
        prev[key] = value
        return True
    return False


class InputError(ValueError):
    """An input item vLLM cannot turn into a message (its 400)."""


def item_messages(items: list[dict]) -> list[dict]:
    """Input items as chat messages (vLLM's construct_chat_messages_with_tool_call)."""
    msgs: list[dict] = []
    for item in items:
        t = item.get("type")
        if t in ("function_call", "custom_tool_call"):
            name = item.get("name")
            if t == "function_call" and item.get("namespace"):
                name = f"{item['namespace']}{NAMESPACE_SEPARATOR}{name}"
            args = item.get("arguments") if t == "function_call" else json.dumps({"input": item.get("input") or ""}, ensure_ascii=False)
            call = {"id": item.get("call_id"), "function": {"name": name, "arguments": args}, "type": "function"}
            if not _fold(msgs, "tool_calls", call):
                msgs.append({"role": "assistant", "tool_calls": [call]})
        elif t == "reasoning":
            if item.get("encrypted_content"):
                raise InputError("Encrypted content is not supported.")
            text = _first_text(item.get("content") or item.get("summary") or []) or ""
            if not _fold(msgs, "reasoning", text):
                msgs.append({"role": "assistant", "reasoning": text})
        elif t in ("function_call_output", "custom_tool_call_output"):
            msgs.append({"role": "tool", "content": item.get("output"), "tool_call_id": item.get("call_id")})
        elif item.get("role") == "assistant" and _first_text(item.get("content")) is not None:
            said = _first_text(item.get("content"))
            if not _fold(msgs, "content", said):
                msgs.append({"role": "assistant", "content": said})
        elif "role" in item:
            msgs.append(dict(item))
        else:
            raise InputError(f"Unsupported input item type: {t}")
    return msgs


def conversation(body: dict, stored: tuple[list[dict], dict] | None) -> list[dict]:
    """The chat vLLM renders: this request's instructions, the stored conversation of
    ``previous_response_id`` (its messages less system ones, then its output text as assistant
    messages), then this request's input."""
    msgs: list[dict] = []
    if body.get("instructions"):
        msgs.append({"role": "system", "content": body["instructions"]})
    if stored is not None:
        prev_msgs, prev_response = stored
        msgs.extend(m for m in prev_msgs if m.get("role") != "system")
        for out in prev_response.get("output", []):
            if out.get("type") == "message":
                msgs.extend({"role": "assistant", "content": part.get("text", "")} for part in out.get("content", []))
    inp = body.get("input")
    if isinstance(inp, str):
        msgs.append({"role": "user", "content": inp})
    else:
        msgs.extend(item_messages(inp or []))
    return msgs


def continues_final(body: dict) -> bool:
    inp = body.get("input")
    if not isinstance(inp, list) or not inp or not isinstance(inp[-1], dict):
        return False
    return inp[-1].get("type", "message") in ("message", "reasoning") and inp[-1].get("status") in ("in_progress", "incomplete")


def chat_tools(body: dict) -> list[dict] | None:
    out = []
    for tool in body.get("tools") or []:
        if tool.get("type") == "function":
            out.append((tool, tool.get("name")))
        elif tool.get("type") == "namespace":
            out.extend((sub, f"{tool.get('name')}{NAMESPACE_SEPARATOR}{sub.get('name')}") for sub in tool.get("tools") or [] if sub.get("type") == "function")
    tools = [
        {"type": "function", "function": {"name": name, "description": t.get("description"), "parameters": t.get("parameters"), "strict": t.get("strict")}}
        for t, name in out
    ]
    return tools or None


def template_kwargs(body: dict) -> dict[str, Any]:
    """vLLM's build_chat_params: the request's kwargs under the generation flags and effort."""
    raw = body.get("chat_template_kwargs")
    given: dict[str, Any] = raw if isinstance(raw, dict) else {}
    cont = continues_final(body)
    kwargs = dict(given)
    kwargs.update(add_generation_prompt=not cont, continue_final_message=cont)
    reasoning = body.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    if effort is not None and effort != "auto":
        kwargs["reasoning_effort"] = effort
        if "enable_thinking" not in given:
            kwargs["enable_thinking"] = effort != "none"
    return kwargs


def includes_logprobs(body: dict) -> bool:
    include = body.get("include")
    return isinstance(include, list) and "message.output_text.logprobs" in include


def output_message(item_id: str, text: str, status: str, logprobs: list | None) -> dict:
    content = [{"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs}] if text else []
    return {"id": item_id, "content": content, "role": "assistant", "status": status, "type": "message"}


def usage(prompt: int, cached: int, output: int) -> dict:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0, "input_tokens_per_turn": [], "cached_tokens_per_turn": []},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0, "tool_output_tokens": 0, "output_tokens_per_turn": [], "tool_output_tokens_per_turn": []},
        "total_tokens": prompt + output,
    }


def response_object(
    body: dict,
    *,
    response_id: str,
    model: str,
    created_at: int,
    output: list[dict],
    status: str,
    max_tokens: int,
    usage_: dict | None,
    kv_transfer_params: dict | None = None,
) -> dict:
    """vLLM's ResponsesResponse.from_request, dumped in its field order."""
    tools = body.get("tools") or []
    tool_choice = body.get("tool_choice", "auto")
    if not tools and tool_choice in ("auto", "none"):
        tool_choice = "none"
    temperature = body.get("temperature")
    top_p = body.get("top_p")
    return {
        "id": response_id,
        "created_at": created_at,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.get("instructions"),
        "metadata": body.get("metadata"),
        "model": model,
        "object": "response",
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True) if body.get("parallel_tool_calls") is not None else True,
        "temperature": 1.0 if temperature is None else float(temperature),
        "tool_choice": tool_choice,
        "tools": tools,
        "top_p": 1.0 if top_p is None else float(top_p),
        "background": bool(body.get("background", False)),
        "max_output_tokens": max_tokens,
        "max_tool_calls": body.get("max_tool_calls"),
        "previous_response_id": body.get("previous_response_id"),
        "prompt": None,
        "prompt_cache_options": None,
        "prompt_cache_key": body.get("prompt_cache_key"),
        "prompt_cache_retention": body.get("prompt_cache_retention"),
        "reasoning": body.get("reasoning"),
        "safety_identifier": body.get("safety_identifier"),
        "service_tier": body.get("service_tier", "auto"),
        "status": status,
        "text": body.get("text"),
        "top_logprobs": body.get("top_logprobs", 0) if includes_logprobs(body) else None,
        "truncation": body.get("truncation") or "disabled",
        "usage": usage_,
        "user": body.get("user"),
        "presence_penalty": float(body.get("presence_penalty") or 0.0),
        "frequency_penalty": float(body.get("frequency_penalty") or 0.0),
        "kv_transfer_params": kv_transfer_params,
        "ec_transfer_params": None,
        "input_messages": None,
        "output_messages": None,
    }


class EventWriter:
    """Numbers and frames the events of one stream (``event: <type>`` + ``data: <json>``)."""

    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, event: dict) -> bytes:
        event["sequence_number"] = self.seq
        self.seq += 1
        return b"event: " + event["type"].encode() + b"\ndata: " + msgspec.json.encode(event) + b"\n\n"


def created_events(write: EventWriter, initial: dict) -> list[bytes]:
    return [
        write({"response": initial, "sequence_number": -1, "type": "response.created"}),
        write({"response": initial, "sequence_number": -1, "type": "response.in_progress"}),
    ]


def text_open(write: EventWriter, item_id: str) -> list[bytes]:
    item = {"id": item_id, "content": [], "role": "assistant", "status": "in_progress", "type": "message"}
    part = {"annotations": [], "text": "", "type": "output_text", "logprobs": []}
    return [
        write({"item": item, "output_index": 0, "sequence_number": -1, "type": "response.output_item.added"}),
        write({"content_index": 0, "item_id": item_id, "output_index": 0, "part": part, "sequence_number": -1, "type": "response.content_part.added"}),
    ]


def text_delta(write: EventWriter, item_id: str, delta: str, logprobs: list[dict]) -> bytes:
    return write(
        {
            "content_index": 0,
            "delta": delta,
            "item_id": item_id,
            "logprobs": logprobs,
            "output_index": 0,
            "sequence_number": -1,
            "type": "response.output_text.delta",
        }
    )


def text_close(write: EventWriter, item_id: str, text: str, status: str, logprobs: list | None) -> tuple[list[bytes], dict]:
    part = {"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs or None}
    item = output_message(item_id, text, status, logprobs or None)
    events = [
        write(
            {
                "content_index": 0,
                "item_id": item_id,
                "logprobs": [],
                "output_index": 0,
                "sequence_number": -1,
                "text": text,
                "type": "response.output_text.done",
            }
        ),
        write({"content_index": 0, "item_id": item_id, "output_index": 0, "part": part, "sequence_number": -1, "type": "response.content_part.done"}),
        write({"item": item, "output_index": 0, "sequence_number": -1, "type": "response.output_item.done"}),
    ]
    return events, item


def terminal_event(write: EventWriter, final: dict) -> bytes:
    kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
    return write({"response": final, "sequence_number": -1, "type": kind})


def now() -> int:
    return int(time.time())
