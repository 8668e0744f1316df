"""The KV-block index: which replica holds which block, in which tier.

One interface, two backends (``memory`` embedded, ``redis`` shared by several gateways;
``kvindex.backends.make_index`` picks one by URL). The index is keyed by kvgate's own chained
block keys (``kvindex.hashing.block_keys``), computed from the ``token_ids`` each BlockStored
event carries, so a lookup never depends on a replica's hash algorithm or seed. Each backend
keeps, per replica, the map from the engine's block hash to our key so that BlockRemoved (which
carries only engine hashes) resolves.

Loss: a shared backend can lose everything at once (Redis restarted empty, FLUSHDB, failover to an
empty replica). ``data_lost`` reports it once per loss; the subscriber then rebuilds the index from
every replica's replay buffer (``forget_local`` first drops what the backend mirrors locally).

Trust: when a replica's event stream has an unrepaired gap, ``mark_untrusted`` makes every
entry it had *so far* invisible to lookups (an epoch bump, O(1)), while its engine-hash map is
kept so that later BlockStored events still chain. AllBlocksCleared, ``drop_replica`` and a
replica restart forget everything of that replica.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from .events import EventBatch

TIER_GPU = 1
TIER_CPU = 2
TIER_STORAGE = 4

TIER_NAMES = {TIER_GPU: "GPU", TIER_CPU: "CPU", TIER_STORAGE: "STORAGE"}
_MEDIUM_TO_TIER = {None: TIER_GPU, "GPU": TIER_GPU, "CPU": TIER_CPU, "STORAGE": TIER_STORAGE, "DISK": TIER_STORAGE}


def medium_tier(medium: str | None) -> int:
    """Tier bit for an event's ``medium`` (None means GPU, as in vLLM's default pool)."""
    return _MEDIUM_TO_TIER.get(medium.upper() if isinstance(medium, str) else medium, TIER_STORAGE)


def best_tier_name(mask: int) -> str:
    """Name of the fastest tier present in a tier bitmask."""
    if mask & TIER_GPU:
        return "GPU"
    if mask & TIER_CPU:
        return "CPU"
    return "STORAGE"


#: a model's block size and lookahead travel as one int: ``block_size | lookahead << 20``
GEOMETRY_SHIFT = 20
GEOMETRY_BLOCK_MASK = (1 << GEOMETRY_SHIFT) - 1


def pack_geometry(block_size: int, lookahead: int) -> int:
    """One int for a model's block size and lookahead (a plain block size when lookahead is 0)."""
    return block_size | lookahead << GEOMETRY_SHIFT


class IndexUnavailableError(RuntimeError):
    """The index backend cannot be reached (e.g. Redis down). Callers route on load alone
    until it answers again; the Redis backend's subclass is also a ``redis.RedisError``."""


class PrefixMatch(NamedTuple):
    """A replica's longest consecutive cached prefix for a request.

    ``blocks`` counts the leading request blocks the replica holds in any tier; ``tier`` is the
    slowest tier among them ("GPU" when the whole match is in GPU memory).
    """

    blocks: int
    tier: str


@dataclass(slots=True)
class ApplyStats:
    """What applying one batch did, for counters."""

    stored: int = 0
    removed: int = 0
    cleared: int = 0
    orphaned: int = 0  # BlockStored blocks whose parent hash was unknown: cannot be keyed


def _ignore(replica: str) -> None:
    pass


class KVIndex(abc.ABC):
    """Backend-neutral index operations. All are coroutines so the Redis backend fits."""

    @abc.abstractmethod
    async def apply(self, replica: str, batch: EventBatch, *, model: str) -> ApplyStats:
        """Apply one decoded event batch published by ``replica`` (serving base ``model``)."""

    @abc.abstractmethod
    async def lookup(self, keys: Sequence[int], *, model: str = "") -> dict[str, PrefixMatch]:
        """Per replica, the longest consecutive prefix of ``keys`` it holds (replicas with 0 omitted).

        ``model`` must be the same base model the events were applied under: the Redis backend
        namespaces its keys by it (the memory backend ignores it; keys already include it).
        """

    @abc.abstractmethod
    async def drop_replica(self, replica: str) -> None:
        """Forget everything ``replica`` holds (restart, AllBlocksCleared, removal from the fleet)."""

    @abc.abstractmethod
    async def mark_untrusted(self, replica: str) -> None:
        """Hide ``replica``'s current entries from lookups; later events count again."""

    @abc.abstractmethod
    async def block_count(self) -> int:
        """Number of distinct block keys held (for the index-size gauge)."""

    def block_size(self, model: str) -> int | None:
        """Block size seen in ``model``'s events, if any (requests must be cut the same way)."""
        return self._block_sizes.get(model)

    def lookahead(self, model: str) -> int:
        """Tokens past each block that ``model``'s replicas hash with it (vLLM 0.33's lookahead
        block hashes, from the events' ``lookahead_token_ids``); 0 when off or not seen yet."""
        return self._lookaheads.get(model, 0)

    def _note_block_size(self, model: str, size: int, lookahead: int = 0) -> None:
        self._block_sizes[model] = size
        self._lookaheads[model] = lookahead

    def _note_geometry(self, model: str, packed: int) -> None:
        """Note a ``pack_geometry`` value (how the Redis backend shares it between processes)."""
        self._note_block_size(model, packed & GEOMETRY_BLOCK_MASK, packed >> GEOMETRY_SHIFT)

    def __init__(self) -> None:
        self._block_sizes: dict[str, int] = {}
        self._lookaheads: dict[str, int] = {}
        self._root_checks: dict[str, Any] = {}
        #: called with a replica id when what the index knew of its cache stopped counting (its
        #: cache cleared, the replica restarted or removed, its entries untrusted): routing
        #: state built on that cache (where new prefixes were placed, speculative entries) goes
        #: too. The memory backend calls it as it applies the change; the Redis backend when
        #: ``check_epochs`` finds the replica's epoch moved (another process may have moved it).
        self.cache_lost: Callable[[str], None] = _ignore

    def set_root_check(self, model: str, check: Any) -> None:
        """Verify ``model``'s prompt starts that carry no extra keys against its replicas' hash
        (an ``event_rules.RootCheck``; vLLM <= 0.14 publishes no salt in its events)."""
        self._root_checks[model] = check

    def root_check(self, model: str) -> Any:
        """``model``'s ``RootCheck``, if one was set (requests are keyed through it then)."""
        return self._root_checks.get(model)

    async def data_lost(self) -> bool:
        """True once after the backend lost its whole contents since the previous call (e.g. Redis
        restarted empty); the first call only sets the reference. Raises ``IndexUnavailableError``
        while the backend cannot be asked. Always False for the memory backend: it lives and dies
        with its process (and its subscriber)."""
        return False

    def forget_local(self, replica: str) -> None:  # noqa: B027 - a deliberate no-op default (nothing mirrored locally), not a forgotten abstractmethod
        """Drop local state mirroring ``replica``'s entries in a shared backend (the Redis
        backend's engine-hash -> key cache), before its events are applied again from a replay
        buffer. No-op for the memory backend, whose maps are the index itself."""

    async def ping(self) -> bool:
        """True when the backend answers (always, for the memory backend)."""
        return True

    async def close(self) -> None:  # noqa: B027 - a deliberate no-op default (no connections), not a forgotten abstractmethod
        """Release connections (no-op for the memory backend)."""
