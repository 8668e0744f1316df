"""The one interface every routing plugin implements: filters, scorers, pickers.

The gateway builds a ``RequestContext`` (tokens → block keys → index lookup already done)
and a list of ``EndpointState`` snapshots, then asks a ``Scheduler`` profile for a ranked list
of endpoints (the first is the choice, the rest are fallbacks for retries). Plugins are pure
functions of those two inputs plus their own bounded state (round-robin counters, the
approx-prefix memory), which they update through ``on_dispatch`` / ``on_complete``.

Scores are normalised to [0, 1] (1 = best) so weights in the YAML mean what they say.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgspec

from kvindex.index import PrefixMatch

ROLE_BOTH = "both"
ROLE_PREFILL = "prefill"
ROLE_DECODE = "decode"

PHASE_ANY = "any"  # one hop: the replica does prefill and decode
PHASE_PREFILL = "prefill"
PHASE_DECODE = "decode"


@dataclass(slots=True)
class EndpointState:
    """What routing knows about one replica at decision time.

    Scraped fields (``running``, ``waiting``, ``kv_usage``) lag by up to a scrape interval;
    the gateway's own ``inflight_*`` counters are exact at dispatch, which is why load
    scorers should lean on them. With several gateways, ``peer_inflight_*`` hold the others'
    counts; load scorers read ``total_inflight_*`` (own + peers) so the gateways do not herd.
    """

    id: str
    url: str
    role: str = ROLE_BOTH
    models: frozenset[str] = frozenset()
    loras: frozenset[str] = frozenset()
    healthy: bool = True
    has_kv_events: bool = True
    # scraped from the replica's /metrics
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    scraped_at: float = 0.0
    # the gateway's own bookkeeping, updated at dispatch and completion
    inflight_requests: int = 0
    inflight_prefill_tokens: int = 0  # uncached prompt tokens dispatched and not yet past first token
    inflight_decode_tokens: int = 0  # tokens (prompt + max_tokens) of requests still generating
    prefill_tokens_per_s: float = 10_000.0  # prefill rate from the replica's config (estimated-ttft's unit)
    labels: Mapping[str, str] = field(default_factory=dict)
    # the same three counts as the other gateways sharing this one's Redis published them
    # (index.share_load; a few ms old): load scorers read the ``total_*`` sums
    peer_inflight_requests: int = 0
    peer_inflight_prefill_tokens: int = 0
    peer_inflight_decode_tokens: int = 0
    #: of the other gateways' latest new-prefix placements, how many went to this replica
    #: (published with their load; the ``placement`` scorer adds its own)
    peer_placements: int = 0

    def serves(self, model: str, lora: str | None = None) -> bool:
        return model in self.models and (lora is None or lora in self.loras)

    @property
    def total_inflight_requests(self) -> int:
        """Requests in flight to this replica from every gateway (this one's exact count plus its peers')."""
        return self.inflight_requests + self.peer_inflight_requests

    @property
    def total_inflight_prefill_tokens(self) -> int:
        return self.inflight_prefill_tokens + self.peer_inflight_prefill_tokens

    @property
    def total_inflight_decode_tokens(self) -> int:
        return self.inflight_decode_tokens + self.peer_inflight_decode_tokens


@dataclass(slots=True)
class RequestContext:
    """One request as routing sees it."""

    request_id: str
    model: str
    lora: str | None = None
    prompt_tokens: int = 0
    max_tokens: int = 16
    block_size: int = 16
    block_keys: Sequence[int] = ()
    #: index lookup: replica id → longest cached prefix (replicas with no match absent)
    prefix: Mapping[str, PrefixMatch] = field(default_factory=dict)
    session_id: str | None = None
    phase: str = PHASE_ANY
    headers: Mapping[str, str] = field(default_factory=dict)
    #: when the index is unavailable (Redis down) precise-prefix scores 0 and load decides
    index_ok: bool = True
    #: replica id → leading blocks of this prompt some gateway sharing the Redis index just
    #: routed there (shared speculative entries; precise-prefix counts them as its own)
    peer_prefix: Mapping[str, int] = field(default_factory=dict)

    def cached_tokens(self, endpoint_id: str) -> int:
        m = self.prefix.get(endpoint_id)
        return 0 if m is None else min(m.blocks * self.block_size, self.prompt_tokens)

    def uncached_tokens(self, endpoint_id: str) -> int:
        return self.prompt_tokens - self.cached_tokens(endpoint_id)


class PluginParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of every plugin's ``Params``: typed, immutable, unknown fields rejected.

    Ranges are declared with ``Annotated[float, msgspec.Meta(ge=0)]`` and enforced when the
    parameters are converted (from the YAML, or the keywords given to a plugin)."""


class NoParams(PluginParams, frozen=True):
    """For plugins that take no parameters."""


class Plugin:
    """Common base: a YAML ``type``, an instance ``name``, typed parameters, feedback hooks.

    Built from keywords, ``PrecisePrefixScorer(cpu_weight=0.3, name="pp-cpu")``: the keywords
    are converted to the class's ``Params`` (so they are checked exactly as YAML params are)
    and kept as ``self.params``."""

    #: the ``type`` string used in the YAML config; set by each concrete plugin
    type_name: ClassVar[str] = ""
    #: the parameter struct; plugins with parameters define a nested ``Params(PluginParams, frozen=True)``
    #: (``frozen=True`` repeated so type checkers see it; the rest of the config is inherited)
    Params: ClassVar[type[PluginParams]] = NoParams

    params: PluginParams
    #: instance name, unique within a profile (``Decision.breakdown`` is keyed by it)
    name: str

    def __init__(self, *, name: str | None = None, **params: Any) -> None:
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"{self.type_name}: name must be a non-empty string, got {name!r}")
        self.name = self.type_name if name is None else name
        self.params = self.parse_params(params)

    @classmethod
    def parse_params(cls, params: Mapping[str, Any]) -> PluginParams:
        """``params`` as this plugin's ``Params``; ValueError naming the field and what it expects."""
        fields = cls.Params.__struct_fields__
        unknown = sorted((k for k in params if k not in fields), key=str)
        if unknown:
            known = f"known: {', '.join(fields)}" if fields else "it takes none"
            raise ValueError(f"{cls.type_name}: unknown parameters {unknown}; {known}")
        try:
            out = msgspec.convert(dict(params), cls.Params)
        except msgspec.ValidationError as exc:
            msg, _, at = str(exc).partition(" - at `$.")
            field = at.rstrip("`")
            if field in params:  # "Expected `float` >= 0.0" / "Expected `int`, got `float`"
                expected = msg.partition(", got ")[0].replace("Expected", "expected", 1)
                raise ValueError(f"{cls.type_name}: parameter {field!r}: {expected}, got {params[field]!r}") from None
            raise ValueError(f"{cls.type_name}: bad parameters: {exc}") from None
        for field in fields:
            value = getattr(out, field)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{cls.type_name}: parameter {field!r}: expected a finite number, got {value!r}")
        return out

    def on_dispatch(self, ctx: RequestContext, endpoint: EndpointState) -> None:
        """Called once the request was sent to ``endpoint`` (every hop, every retry)."""

    def on_complete(self, ctx: RequestContext, endpoint: EndpointState, ok: bool) -> None:
        """Called when the request finished on ``endpoint`` (ok False on error)."""

    def on_cache_lost(self, endpoint_id: str) -> None:
        """Called when the replica's prefix cache is known gone (cleared, restarted, removed,
        its index entries untrusted): state about what it caches is void."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, params={self.params!r})"


class Filter(Plugin, abc.ABC):
    """Removes endpoints that must not serve the request."""

    @abc.abstractmethod
    def filter(self, ctx: RequestContext, endpoints: list[EndpointState]) -> list[EndpointState]: ...


class Scorer(Plugin, abc.ABC):
    """Rates each candidate in [0, 1], 1 being best."""

    @abc.abstractmethod
    def score(self, ctx: RequestContext, endpoints: list[EndpointState]) -> dict[str, float]: ...


class Picker(Plugin, abc.ABC):
    """Orders the scored candidates: first is the pick, the rest are fallbacks."""

    @abc.abstractmethod
    def pick(self, ctx: RequestContext, scored: list[tuple[EndpointState, float]]) -> list[EndpointState]: ...


@dataclass(slots=True)
class Decision:
    """A scheduling result with enough detail for debug logs and metrics."""

    ranked: list[EndpointState]
    scores: dict[str, float]
    breakdown: dict[str, dict[str, float]]  # scorer instance name → endpoint id → raw [0,1] score
    profile: str

    @property
    def chosen(self) -> EndpointState | None:
        return self.ranked[0] if self.ranked else None
