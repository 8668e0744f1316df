"""The fleet as the gateway sees it: health, circuit breakers, scraped load, in-flight counts.

Three sources feed each replica's ``EndpointState``:

* a prober (``GET /v1/models`` on an interval) that also discovers served models and LoRA
  adapters, and drives a circuit breaker together with passive failures from the proxy;
  a replica that answers 401 (it wants an API key, or another one) is alive: it stays
  healthy, and is flagged ``auth_rejected`` until it accepts the gateway's key;
* a scraper of the replica's Prometheus ``/metrics`` (vLLM names: running, waiting, KV usage);
* the gateway's own in-flight counters, changed at dispatch, first byte and completion on
  every path (scraped gauges lag by a scrape interval; these do not); with several gateways
  on one Redis index, the others' counts beside them (``peer_inflight_*``, set by
  ``gateway.shared_load``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import httpx

from scorers.base import EndpointState

from .config import HealthConfig, ReplicaConfig, ScrapeConfig
from .proxy import ProbeClient

log = logging.getLogger("kvgate.endpoints")

_RUNNING = ("vllm:num_requests_running",)
_WAITING = ("vllm:num_requests_waiting",)
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
#: vLLM's request header choosing a data-parallel rank (read by its OpenAI serving code)
DP_RANK_HEADER = "x-data-parallel-rank"
_NO_AUTH: Mapping[str, str] = {}


def _nothing() -> None:
    pass


@dataclass(slots=True)
class Circuit:
    """Closed → (threshold consecutive failures) → open for a cooldown → a probe may close it."""

    threshold: int
    cooldown_s: float
    failures: int = 0
    opened_at: float | None = None

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def success(self) -> bool:
        """Record a success; True if this closed an open circuit."""
        was_open = self.opened_at is not None
        self.failures = 0
        self.opened_at = None
        return was_open

    def failure(self, now: float) -> bool:
        """Record a failure; True if this opened the circuit."""
        self.failures += 1
        if self.opened_at is None and self.failures >= self.threshold:
            self.opened_at = now
            return True
        return False

    def probe_allowed(self, now: float) -> bool:
        return self.opened_at is None or now - self.opened_at >= self.cooldown_s


@dataclass(slots=True)
class ModelInfo:
    """A model name clients may ask for, and what it maps to on the replicas."""

    id: str
    base: str
    lora: str | None = None
    max_model_len: int | None = None
    replicas: set[str] = field(default_factory=set)


def parse_vllm_metrics(text: str, engine: int | None = None) -> tuple[float, float, float]:
    """(running, waiting, kv_usage) summed over a replica's engines from Prometheus text; with
    ``engine``, only that data-parallel rank's series (vLLM labels each with ``engine``).

    A line scan for the three families, not a full exposition parser: a vLLM ``/metrics`` body
    is a few hundred lines (histograms) scraped every second per replica, and prometheus_client's
    parser spent most of the gateway's background CPU on lines nobody reads. A wanted line that
    does not parse raises ValueError (the scrape is skipped, as before).
    """
    running = waiting = 0.0
    kv: list[float] = []
    only = None if engine is None else str(engine)
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        end = len(line)
        for stop in ("{", " ", "\t"):
            i = line.find(stop, 0, end)
            if i != -1:
                end = i
        name = line[:end]
        if name in _RUNNING:
            which = 0
        elif name in _WAITING:
            which = 1
        elif name in _KV_USAGE:
            which = 2
        else:
            continue
        rest = line[end:]
        labels: dict[str, str] = {}
        if rest.startswith("{"):
            labels, rest = _labels(rest)
        if only is not None and labels.get("engine", only) != only:
            continue
        fields = rest.split()
        if not fields:
            raise ValueError(f"no value: {line!r}")
        value = float(fields[0])
        if which == 0:
            running += value
        elif which == 1:
            waiting += value
        else:
            kv.append(value)
    kv_usage = max(kv) if kv else 0.0
    return running, waiting, kv_usage


_ESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _labels(rest: str) -> tuple[dict[str, str], str]:
    """``{a="x",b="y"} value`` → ({a: x, b: y}, " value"); values may hold escaped quotes."""
    out: dict[str, str] = {}
    i, n = 1, len(rest)
    while True:
        while i < n and rest[i] in " ,":
            i += 1
        if i < n and rest[i] == "}":
            return out, rest[i + 1 :]
        eq = rest.find("=", i)
        if eq == -1 or eq + 1 >= n or rest[eq + 1] != '"':
            raise ValueError(f"bad labels: {rest!r}")
        key = rest[i:eq].strip()
        j = eq + 2
        chars: list[str] = []
        while True:
            if j >= n:
                raise ValueError(f"unterminated label value: {rest!r}")
            c = rest[j]
            if c == '"':
                break
            if c == "\\" and j + 1 < n:
                chars.append(_ESCAPES.get(rest[j : j + 2], rest[j + 1]))
                j += 2
                continue
            chars.append(c)
            j += 1
        out[key] = "".join(chars)
        i = j + 1


class Fleet:
    """Live state of the configured replicas; the only writer of ``EndpointState``."""

    def __init__(
        self,
        replicas: Iterable[ReplicaConfig],
        client: httpx.AsyncClient | ProbeClient,
        health: HealthConfig | None = None,
        scrape: ScrapeConfig | None = None,
    ) -> None:
        self.health_cfg = health or HealthConfig()
        self.scrape_cfg = scrape or ScrapeConfig()
        self.client = client
        self.configs: dict[str, ReplicaConfig] = {}
        self.states: dict[str, EndpointState] = {}
        self.circuits: dict[str, Circuit] = {}
        self.discovered: dict[str, dict[str, ModelInfo]] = {}
        self._models: dict[str, ModelInfo] | None = None  # models() cache, dropped when lists change
        #: per replica, the header that carries its API key ({} without one); never logged
        self._auth: dict[str, Mapping[str, str]] = {}
        self._keys: dict[str, str | None] = {}
        #: replicas whose last answer was a 401 to the gateway's credentials
        self.auth_rejected: set[str] = set()
        #: replicas discovery says are not ready (pod not Ready, or terminating): never healthy
        self.unready: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self.on_health_change: list = []  # callbacks (replica_id, healthy) → None
        #: called at every change of the in-flight counts (gateway.shared_load publishes them)
        self.load_changed: Callable[[], None] = _nothing
        for r in replicas:
            self.add(r)

    # -- membership ---------------------------------------------------------------------------

    def add(self, r: ReplicaConfig) -> None:
        self._models = None
        self.configs[r.id] = r
        self.states[r.id] = EndpointState(
            id=r.id,
            url=r.url.rstrip("/"),
            role=r.role,
            models=frozenset(r.models),
            healthy=True,
            has_kv_events=r.kv_events is not None,
            prefill_tokens_per_s=r.prefill_tokens_per_s,
            labels=dict(r.labels),
        )
        self.circuits[r.id] = Circuit(self.health_cfg.failure_threshold, self.health_cfg.cooldown_s)
        key = r.resolved_api_key()
        self._keys[r.id] = key
        extra: dict[str, str] = {"authorization": f"Bearer {key}"} if key else {}
        if r.data_parallel_rank is not None:
            extra[DP_RANK_HEADER] = str(r.data_parallel_rank)
        self._auth[r.id] = extra or _NO_AUTH

    def remove(self, rid: str) -> EndpointState | None:
        """Take replica ``rid`` out of the fleet (discovery: its pod is gone). Requests already
        sent to it finish: they hold its ``EndpointState``, which is marked unhealthy so that a
        retry or a P/D redo planned before the removal skips it. Returns that state."""
        state = self.states.pop(rid, None)
        if state is None:
            return None
        self._models = None
        for table in (self.configs, self.circuits, self.discovered, self._auth, self._keys):
            table.pop(rid, None)
        self.auth_rejected.discard(rid)
        self.unready.discard(rid)
        state.healthy = False
        return state

    def update(self, r: ReplicaConfig) -> None:
        """Change replica ``r.id`` in place (a relabelled pod: role, labels, models): its circuit,
        discovered models and in-flight counts stay. Adds it if unknown."""
        state = self.states.get(r.id)
        if state is None:
            self.add(r)
            return
        self._models = None
        old = set(self.configs[r.id].models)
        self.configs[r.id] = r
        state.url = r.url.rstrip("/")
        state.role = r.role
        state.labels = dict(r.labels)
        state.has_kv_events = r.kv_events is not None
        state.prefill_tokens_per_s = r.prefill_tokens_per_s
        discovered = {m.base for m in self.discovered.get(r.id, {}).values()}
        state.models = frozenset((set(state.models) - old) | discovered | set(r.models))

    def set_ready(self, rid: str, ready: bool) -> None:
        """Discovery's readiness (the pod's Ready condition): a replica not ready is unhealthy
        whatever its circuit says; ready again, its circuit decides."""
        if ready:
            self.unready.discard(rid)
        else:
            self.unready.add(rid)
        circuit = self.circuits.get(rid)
        if circuit is not None:
            self._set_health(rid, not circuit.is_open)

    def circuit_open(self) -> list[EndpointState]:
        """Replicas unhealthy only because their circuit is open (ready, if discovery says so):
        what panic routing may still try."""
        return [s for s in self.states.values() if not s.healthy and s.id not in self.unready and (c := self.circuits.get(s.id)) is not None and c.is_open]

    def reset_circuit(self, rid: str) -> None:
        """Forget failures (the replica restarted: what failed before says nothing now)."""
        circuit = self.circuits.get(rid)
        if circuit is not None:
            circuit.success()
            self._set_health(rid, True)

    def api_key(self, rid: str) -> str | None:
        return self._keys.get(rid)

    def upstream_auth(self, rid: str) -> Mapping[str, str]:
        """Headers the gateway adds to every call to replica ``rid``: its API key, and for one
        data-parallel rank of a vLLM server, the rank (empty when neither applies)."""
        return self._auth.get(rid, _NO_AUTH)

    def has_key(self, rid: str) -> bool:
        return bool(self._keys.get(rid))

    def dp_rank(self, rid: str | None) -> int | None:
        """The vLLM data-parallel rank replica ``rid`` stands for (None: the whole server)."""
        r = self.configs.get(rid) if rid is not None else None
        return r.data_parallel_rank if r is not None else None

    def auth_rejected_by(self, rid: str, where: str) -> None:
        """Replica ``rid`` answered 401 to the gateway: a configuration problem, not an outage."""
        if rid not in self.auth_rejected:
            self.auth_rejected.add(rid)
            how = "the configured API key" if self.has_key(rid) else "no API key (set replicas[].api_key or api_key_env)"
            log.warning("replica %s rejected the gateway's credentials (HTTP 401 on %s); the gateway sends %s", rid, where, how)

    def auth_accepted_by(self, rid: str) -> None:
        if rid in self.auth_rejected:
            self.auth_rejected.discard(rid)
            log.warning("replica %s accepts the gateway's credentials again", rid)

    def get(self, replica_id: str) -> EndpointState | None:
        return self.states.get(replica_id)

    def all(self) -> list[EndpointState]:
        return list(self.states.values())

    # -- models -------------------------------------------------------------------------------

    def models(self) -> dict[str, ModelInfo]:
        """Every model id a client may request: configured base models, discovered models and LoRAs.

        Built when the replicas' model lists change, not per request (``resolve_model`` is on
        every request's path; rebuilding this map there cost a few µs per replica each time)."""
        if self._models is None:
            self._models = self._build_models()
        return self._models

    def _build_models(self) -> dict[str, ModelInfo]:
        out: dict[str, ModelInfo] = {}
        for rid, state in self.states.items():
            for m in state.models:
                out.setdefault(m, ModelInfo(id=m, base=m)).replicas.add(rid)
            for info in self.discovered.get(rid, {}).values():
                cur = out.setdefault(info.id, ModelInfo(id=info.id, base=info.base, lora=info.lora, max_model_len=info.max_model_len))
                cur.replicas.add(rid)
                if cur.max_model_len is None:
                    cur.max_model_len = info.max_model_len
        return out

    def resolve_model(self, name: str) -> ModelInfo | None:
        return self.models().get(name)

    def _apply_discovery(self, rid: str, payload: dict) -> None:
        found: dict[str, ModelInfo] = {}
        for item in payload.get("data", []) or []:
            mid = item.get("id")
            if not isinstance(mid, str):
                continue
            parent = item.get("parent")
            base = parent if isinstance(parent, str) and parent and parent != mid else mid
            lora = mid if base != mid else None
            found[mid] = ModelInfo(id=mid, base=base, lora=lora, max_model_len=item.get("max_model_len"))
        state = self.states.get(rid)
        if state is None:  # removed while its probe was under way
            return
        configured = set(self.configs[rid].models)
        bases = frozenset({m.base for m in found.values()} | configured)
        loras = frozenset(m.lora for m in found.values() if m.lora)
        if found != self.discovered.get(rid) or bases != state.models or loras != state.loras:
            self._models = None
        self.discovered[rid] = found
        state.models = bases
        state.loras = loras

    # -- health -------------------------------------------------------------------------------

    def record_success(self, rid: str) -> None:
        circuit = self.circuits.get(rid)
        if circuit is not None and circuit.success():
            self._set_health(rid, True)

    def record_failure(self, rid: str) -> None:
        circuit = self.circuits.get(rid)
        if circuit is not None and circuit.failure(time.monotonic()):
            self._set_health(rid, False)

    def _set_health(self, rid: str, healthy: bool) -> None:
        state = self.states.get(rid)
        healthy = healthy and rid not in self.unready
        if state is None or state.healthy == healthy:
            return
        state.healthy = healthy
        log.warning("replica %s is now %s", rid, "healthy" if healthy else "unhealthy")
        for cb in self.on_health_change:
            cb(rid, healthy)

    async def probe(self, rid: str) -> bool:
        """One health probe (GET /v1/models), which also refreshes model discovery.

        A 401 means the replica is up and refuses the gateway's key: it counts as alive (the
        circuit stays closed, so requests reach it and get the 502 that names the problem,
        instead of a 503 that hides it), discovery keeps what it last knew."""
        state = self.states.get(rid)
        if state is None:  # removed (discovery) since the probe was planned
            return False
        try:
            resp = await self.client.get(f"{state.url}/v1/models", headers=self.upstream_auth(rid), timeout=self.health_cfg.timeout_s)
            ok = resp.status_code in (200, 401)
            if self.states.get(rid) is not state:  # removed or replaced meanwhile: not its answer
                return False
            if resp.status_code == 200:
                self._apply_discovery(rid, resp.json())
                self.auth_accepted_by(rid)
            elif resp.status_code == 401:
                self.auth_rejected_by(rid, "GET /v1/models")
        except (httpx.HTTPError, ValueError, OSError):
            ok = False
            if self.states.get(rid) is not state:
                return False
        if ok:
            self.record_success(rid)
        else:
            self.record_failure(rid)
        return ok

    async def probe_all(self) -> None:
        now = time.monotonic()
        rids = [rid for rid, c in self.circuits.items() if c.probe_allowed(now)]
        await asyncio.gather(*(self.probe(rid) for rid in rids))

    async def scrape(self, rid: str) -> None:
        state = self.states.get(rid)
        if state is None:
            return
        try:
            resp = await self.client.get(f"{state.url}/metrics", headers=self.upstream_auth(rid), timeout=self.scrape_cfg.timeout_s)
            if resp.status_code != 200:
                return
            running, waiting, kv = parse_vllm_metrics(resp.text, self.dp_rank(rid))
        except (httpx.HTTPError, ValueError, OSError):
            return
        state.running, state.waiting, state.kv_usage = running, waiting, kv
        state.scraped_at = time.monotonic()

    async def scrape_all(self) -> None:
        await asyncio.gather(*(self.scrape(rid) for rid, s in self.states.items() if s.healthy))

    async def _loop(self, interval: float, step) -> None:
        while True:
            try:
                await step()
            except Exception:  # a background loop must never die silently
                log.exception("fleet background step failed")
            await asyncio.sleep(interval)

    async def start(self) -> None:
        """First probe synchronously (so /v1/models works at once), then background loops."""
        await self.probe_all()
        await self.scrape_all()
        self._tasks = [
            asyncio.create_task(self._loop(self.health_cfg.interval_s, self.probe_all)),
            asyncio.create_task(self._loop(self.scrape_cfg.interval_s, self.scrape_all)),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []

    # -- in-flight bookkeeping ------------------------------------------------------------------

    def dispatched(self, rid: str, prefill_tokens: int, decode_tokens: int) -> None:
        s = self.states.get(rid)
        self.load_changed()
        if s is not None:
            s.inflight_requests += 1
            s.inflight_prefill_tokens += prefill_tokens
            s.inflight_decode_tokens += decode_tokens

    def first_byte(self, rid: str, prefill_tokens: int) -> None:
        s = self.states.get(rid)
        self.load_changed()
        if s is not None:
            s.inflight_prefill_tokens = max(0, s.inflight_prefill_tokens - prefill_tokens)

    def finished(self, rid: str, prefill_tokens_left: int, decode_tokens: int) -> None:
        s = self.states.get(rid)
        self.load_changed()
        if s is not None:
            s.inflight_requests = max(0, s.inflight_requests - 1)
            s.inflight_prefill_tokens = max(0, s.inflight_prefill_tokens - prefill_tokens_left)
            s.inflight_decode_tokens = max(0, s.inflight_decode_tokens - decode_tokens)
