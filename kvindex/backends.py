"""Choosing an index backend by URL.

Its own module, above both backends: ``kvindex.index`` holds only the interface that the
backends implement, so it cannot also import them without a cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .event_rules import RootCheck
from .index import KVIndex
from .memory_index import MemoryIndex
from .redis_index import RedisIndex


def make_index(url: str | None = None, *, root_checks: Mapping[str, RootCheck] | None = None, **options: Any) -> KVIndex:
    """Build a backend from a URL: None / "memory" → embedded; "redis://..." → Redis.

    ``options`` go to the backend's constructor as they are (``MemoryIndex``: ``max_blocks``;
    ``RedisIndex``: ``ttl_s``, ``namespace``, ...), so each backend checks its own.
    ``root_checks``: per base model, how its replicas hash (see ``RootCheck``).
    """
    index: KVIndex
    if not url or url == "memory":
        index = MemoryIndex(**options)
    elif url.startswith(("redis://", "rediss://", "unix://")):
        index = RedisIndex(url, **options)
    else:
        raise ValueError(f"unknown index backend {url!r}: use 'memory' or a redis:// URL")
    for model, check in (root_checks or {}).items():
        index.set_root_check(model, check)
    return index
