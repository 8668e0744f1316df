"""Choosing an index backend by URL.

Its own module, above both backends: ``kvindex.index`` holds only the interface that the
backends implement, so it cannot also import them without a cycle.
"""

from __future__ import annotations

from typing import Any

from .index import KVIndex
from .memory_index import MemoryIndex
from .redis_index import RedisIndex


def make_index(url: str | None = None, **options: Any) -> KVIndex:
    """Build a backend from a URL: None / "memory" → embedded; "redis://..." → Redis.

    ``options`` go to the backend's constructor as they are (``MemoryIndex``: ``max_blocks``;
    ``RedisIndex``: ``ttl_s``, ``namespace``, ...), so each backend checks its own.
    """
    if not url or url == "memory":
        return MemoryIndex(**options)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisIndex(url, **options)
    raise ValueError(f"unknown index backend {url!r}: use 'memory' or a redis:// URL")
