"""Builders for the routing-plugin tests: endpoints, request contexts, plugins from YAML specs."""

from __future__ import annotations

from typing import Any

import pytest

from scorers.base import EndpointState, Plugin, RequestContext
from scorers.scheduler import build_plugin

#: the YAML location the plugins built here report in their errors
WHERE = "scheduling.profiles.t.x"


def eps(n: int = 3, **kw: Any) -> list[EndpointState]:
    """``n`` endpoints ``e0``… serving model ``m`` (keywords set any other field on all of them)."""
    return [EndpointState(id=f"e{i}", url=f"http://e{i}", models=frozenset({"m"}), **kw) for i in range(n)]


def ctx(**kw: Any) -> RequestContext:
    """A request for model ``m``: 160 prompt tokens in 10 blocks of 16 (keys 0..9), overridable."""
    base: dict[str, Any] = dict(request_id="r", model="m", prompt_tokens=160, block_size=16, block_keys=list(range(10)))
    base.update(kw)
    return RequestContext(**base)


def build(kind: type[Plugin], spec: Any) -> Any:
    """A plugin from a YAML spec, the way profiles build them."""
    return build_plugin(spec, kind, WHERE)


def config_error(kind: type[Plugin], spec: Any) -> str:
    """The message of the ValueError building ``spec`` raises (checked to carry the YAML location)."""
    with pytest.raises(ValueError) as exc:
        build_plugin(spec, kind, WHERE)
    msg = str(exc.value)
    assert msg.startswith(f"{WHERE}: "), msg
    return msg.removeprefix(f"{WHERE}: ")
