"""Replicas discovered in Kubernetes, live: pods by label selector, or an InferencePool's pods.

Each selected pod with an IP is one replica: id = pod name, URL = pod IP and port, role from
its ``llm-d.ai/role`` label (``role_label``), KV-event and replay endpoints = pod IP and the
configured ports. A pod may override the ports with the annotations ``kvgate.io/port``,
``kvgate.io/kv-events-port`` ("none": no events) and ``kvgate.io/replay-port``, and name its
served models in ``kvgate.io/models`` (comma-separated; label values cannot hold the "/" of
``Qwen/Qwen2.5-7B``). Without models the pod's own /v1/models tells (the fleet's probe), and
its KV events are indexed once that is known. A pod whose vLLM runs several data-parallel
ranks behind one API server says so in ``kvgate.io/data-parallel-size``: it becomes one
replica per rank, ``<pod>-dp<rank>``, each with that rank's event and replay ports (vLLM adds
the rank to the configured ports) and addressed with vLLM's ``X-data-parallel-rank`` header,
as a static replica with ``data_parallel_size`` is.

Readiness is the pod's ``Ready`` condition; a pod being deleted (``deletionTimestamp``) or not
``Running`` is not ready: it stays in the fleet, unroutable, so that requests already sent
there finish and a pod that is briefly unready keeps its index entries. A pod that leaves (it
is deleted, or stops matching the selector) leaves the fleet: requests in flight to it finish,
its KV-event subscription stops and its index entries are dropped. A pod replaced under the
same name (new uid or IP: a StatefulSet pod, a restarted one) is the same replica id with a
new circuit, a new subscription and an empty index; one whose containers restarted in place
(``restartCount``) gets its circuit reset (the subscriber sees its KV-event sequence start
over and forgets its blocks by itself).

The Kubernetes protocol (one ``Reflector`` per watched resource): list (in pages, one
consistent snapshot), then watch from the list's resourceVersion with
``allowWatchBookmarks=true`` and a server-side ``timeoutSeconds``; every event and bookmark
moves the resourceVersion on; a watch that ends is renewed from there; a dropped connection
or an error is retried from there after a backoff (doubling, capped); 410 Gone (an ERROR event
whose Status has code 410, or an HTTP 410) means the history is compacted: list again and
reconcile, which applies the removals that happened meanwhile. The reflector keeps the set of
objects the API server has; the fleet is reconciled against that whole set (level-triggered),
so an event seen twice or a relist changes nothing twice, and nothing depends on seeing every
intermediate state.

With ``kind: inferencepool`` the named pool is watched too (``inference.networking.k8s.io/v1``:
``spec.selector.matchLabels`` and ``spec.targetPorts[0].number``; ``v1alpha2``: the flat
``spec.selector`` and ``spec.targetPortNumber``). When its selector or port changes the pods
are listed again under the new selector; the old set stays in force until that list arrives.
``kvgate extproc`` builds the same ``Gateway``, so as the pool's endpoint picker it routes to
the pool's pods as they come and go.

Three programs keep something equal to the discovered pods: the gateway (and ``kvgate
extproc``: its fleet and KV-event subscriptions), ``kvgate indexer`` (its KV-event
subscriptions, feeding the shared Redis index) and the decode pod's ``kvgate sidecar`` (the
prefill endpoints it may call, ``roles``). Each hands ``Discovery`` what it has of a gateway
(``DiscoveryHost``: config, fleet, subscriber, metrics registry).

The client is ``kubernetes_asyncio`` (the optional extra ``k8s``): in cluster it reads the
service-account token (re-read as it rotates) and CA from
/var/run/secrets/kubernetes.io/serviceaccount and ``KUBERNETES_SERVICE_HOST``/``PORT``;
otherwise a kubeconfig (``discovery.kubeconfig``, ``$KUBECONFIG``, ``~/.kube/config``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from kvindex.subscriber import ReplicaSource

from .config import DiscoveryConfig, GatewayConfig, ReplicaConfig, offset_endpoint
from .metrics import counter, gauge

if TYPE_CHECKING:
    from kvindex.subscriber import EventSubscriber
    from scorers.base import EndpointState

    from .fleet import Fleet

log = logging.getLogger("kvgate.discovery")

ANN_PORT = "kvgate.io/port"
ANN_EVENTS_PORT = "kvgate.io/kv-events-port"
ANN_REPLAY_PORT = "kvgate.io/replay-port"
ANN_MODELS = "kvgate.io/models"
ANN_DP_SIZE = "kvgate.io/data-parallel-size"
#: more ranks than this behind one API server is a typo, not a deployment
MAX_DP_SIZE = 1024
DEFAULT_POD_SELECTOR = "llm-d.ai/inferenceServing=true"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
ROLES = ("both", "prefill", "decode")


class DiscoveryError(RuntimeError):
    """Discovery cannot run at all (the client is not installed or not configured)."""


class Gone(Exception):
    """The resourceVersion watched from is no longer in the API server's history (410)."""


class PodSkipped(ValueError):
    """A selected pod that cannot be a replica (bad annotation, unknown role); says why."""


class LiveRegistry(Protocol):
    """Where discovery registers its metrics, read at scrape time (``GatewayMetrics``)."""

    def add_live(self, read: Callable[[], Iterable[Any]]) -> None: ...


class DiscoveryHost(Protocol):
    """What discovery keeps in step: a ``Gateway``, or the parts of one that ``kvgate indexer``
    and ``kvgate sidecar`` have (read-only members, so a ``Gateway`` is one as it stands)."""

    @property
    def cfg(self) -> GatewayConfig: ...

    @property
    def fleet(self) -> Fleet: ...

    @property
    def subscriber(self) -> EventSubscriber | None: ...

    @property
    def metrics(self) -> LiveRegistry: ...


# -- a pod as a replica ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PodReplica:
    """What the fleet needs to know of one pod."""

    id: str
    uid: str
    url: str
    kv_events: str | None
    replay: str | None
    role: str
    models: tuple[str, ...]
    labels: tuple[tuple[str, str], ...]
    ready: bool
    restarts: int
    #: ranks behind this pod's API server (annotation kvgate.io/data-parallel-size); the
    #: expansion (``expand_pod``) makes one replica per rank, each with its rank set
    data_parallel_size: int = 1
    data_parallel_rank: int | None = None

    @property
    def identity(self) -> tuple[str, str, str | None, str | None]:
        """What, changed, makes this another process: a new pod, address or event endpoints."""
        return (self.uid, self.url, self.kv_events, self.replay)


def _port(value: str | None, default: int | None, what: str, allow_none: bool = False) -> int | None:
    if value is None:
        return default
    value = value.strip()
    if allow_none and value.lower() in ("none", ""):
        return None
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise PodSkipped(f"annotation {what}={value!r} is not a port")
    return int(value)


def _dp_size(value: str | None) -> int:
    if value is None:
        return 1
    value = value.strip()
    if not value.isdigit() or not 1 <= int(value) <= MAX_DP_SIZE:
        raise PodSkipped(f"annotation {ANN_DP_SIZE}={value!r} is not a rank count (1..{MAX_DP_SIZE})")
    return int(value)


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def pod_ready(pod: dict[str, Any]) -> bool:
    """Running, not being deleted, and its Ready condition True."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") != "Running":
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def pod_replica(pod: dict[str, Any], cfg: DiscoveryConfig, pool_port: int | None = None) -> PodReplica | None:
    """The replica a pod stands for; None while it has no IP or once it has finished.
    Raises ``PodSkipped`` for a pod that is selected but unusable."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    ip = status.get("podIP")
    if not ip or status.get("phase") in ("Succeeded", "Failed"):
        return None
    labels: dict[str, str] = meta.get("labels") or {}
    ann: dict[str, str] = meta.get("annotations") or {}
    role = labels.get(cfg.role_label, cfg.default_role)
    if role not in ROLES:
        raise PodSkipped(f"label {cfg.role_label}={role!r} is not one of {', '.join(ROLES)}")
    port = _port(ann.get(ANN_PORT), pool_port or cfg.port, ANN_PORT)
    events = _port(ann.get(ANN_EVENTS_PORT), cfg.kv_events_port, ANN_EVENTS_PORT, allow_none=True)
    replay = _port(ann.get(ANN_REPLAY_PORT), cfg.replay_port, ANN_REPLAY_PORT, allow_none=True) if events is not None else None
    if ANN_MODELS in ann:
        models = tuple(m.strip() for m in ann[ANN_MODELS].split(",") if m.strip())
    elif cfg.model_label and labels.get(cfg.model_label):
        models = (labels[cfg.model_label],)
    else:
        models = tuple(cfg.models)
    dp = _dp_size(ann.get(ANN_DP_SIZE))
    for what, p in ((ANN_EVENTS_PORT, events), (ANN_REPLAY_PORT, replay)):
        if p is not None and p + dp - 1 > 65535:
            raise PodSkipped(f"{what} {p} plus {dp - 1} data-parallel ranks passes port 65535")
    host = _host(ip)
    restarts = sum(int(c.get("restartCount") or 0) for c in status.get("containerStatuses") or [])
    return PodReplica(
        id=meta["name"],
        uid=meta.get("uid", ""),
        url=f"{cfg.scheme}://{host}:{port}",
        kv_events=f"tcp://{host}:{events}" if events is not None else None,
        replay=f"tcp://{host}:{replay}" if replay is not None else None,
        role=role,
        models=models,
        labels=tuple(sorted(labels.items())),
        ready=pod_ready(pod),
        restarts=restarts,
        data_parallel_size=dp,
    )


def expand_pod(p: PodReplica) -> list[PodReplica]:
    """One replica per data-parallel rank of the pod (the pod itself when it has one rank):
    ``<pod>-dp<rank>``, events and replay on the ports plus the rank, as vLLM binds them
    (``gateway.config.expand_data_parallel`` does the same for a static replica)."""
    if p.data_parallel_size <= 1:
        return [p]
    return [
        replace(
            p,
            id=f"{p.id}-dp{rank}",
            kv_events=offset_endpoint(p.kv_events, rank),
            replay=offset_endpoint(p.replay, rank),
            data_parallel_size=1,
            data_parallel_rank=rank,
        )
        for rank in range(p.data_parallel_size)
    ]


def pool_target(pool: dict[str, Any]) -> tuple[dict[str, str], int | None]:
    """(matchLabels, target port) of an InferencePool, v1 or v1alpha2 shape."""
    spec = pool.get("spec") or {}
    selector = spec.get("selector") or {}
    labels = selector.get("matchLabels") if isinstance(selector.get("matchLabels"), dict) else selector
    ports = spec.get("targetPorts") or []
    port = ports[0].get("number") if ports and isinstance(ports[0], dict) else spec.get("targetPortNumber")
    return {str(k): str(v) for k, v in (labels or {}).items()}, int(port) if port else None


# -- list + watch ---------------------------------------------------------------------------------


@dataclass
class ReflectorStats:
    lists: int = 0
    watches: int = 0
    events: int = 0
    bookmarks: int = 0
    expired: int = 0  # 410 Gone: the history was compacted, listed again
    errors: int = 0  # failed lists, dropped or failed watches (retried after a backoff)


class Reflector:
    """The objects of one resource as the API server has them, kept by list + watch.

    ``list_call`` is a kubernetes_asyncio list method with its positional arguments bound
    (``CoreV1Api.list_namespaced_pod`` with the namespace); ``params`` its selectors.
    ``on_change`` is called (synchronously) after every relist and every change."""

    def __init__(self, name: str, list_call: Callable[..., Any], params: dict[str, Any], on_change: Callable[[], None], cfg: DiscoveryConfig) -> None:
        self.name = name
        self.list_call = list_call
        self.params = params
        self.on_change = on_change
        self.cfg = cfg
        self.items: dict[str, dict[str, Any]] = {}
        self.resource_version: str | None = None
        self.synced = asyncio.Event()  # set by the first complete list
        self.stats = ReflectorStats()
        self._said: dict[str, float] = {}

    async def run(self) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        delay = self.cfg.backoff_s
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                    delay = self.cfg.backoff_s
                started, seen = time.monotonic(), self.stats.events + self.stats.bookmarks
                await self._watch()
                if self.stats.events + self.stats.bookmarks > seen or time.monotonic() - started > 1.0:
                    delay = self.cfg.backoff_s
                    continue  # ended by timeoutSeconds: renew from where it was
                # ended at once, with nothing: do not hammer a server that does that
            except asyncio.CancelledError:
                raise
            except Gone:
                self.stats.expired += 1
                self.resource_version = None
                log.info("discovery: %s resourceVersion expired (410 Gone): listing again", self.name)
                continue
            except ApiException as exc:
                if exc.status == 410:  # a continue token or a watch version gone, in any form
                    self.stats.expired += 1
                    self.resource_version = None
                    continue
                self._trouble(f"HTTP {exc.status} {exc.reason}")
            except Exception as exc:
                self._trouble(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.cfg.backoff_max_s)

    def _trouble(self, what: str) -> None:
        self.stats.errors += 1
        now = time.monotonic()
        if now - self._said.get(what, 0.0) > 30.0:  # one line per kind of trouble every 30 s
            self._said[what] = now
            log.warning("discovery: %s list/watch failed (%s); retrying from resourceVersion %s", self.name, what, self.resource_version or "(relist)")

    async def _list(self) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        items: dict[str, dict[str, Any]] = {}
        token: str | None = None
        while True:
            kw: dict[str, Any] = dict(self.params, limit=self.cfg.page_size)
            if token:
                kw["_continue"] = token
            resp = await self.list_call(**kw, _preload_content=False, _request_timeout=(10.0, 60.0))
            try:
                body = await resp.read()
                if not 200 <= resp.status < 300:
                    raise ApiException(status=resp.status, reason=body[:200].decode(errors="replace"))
            finally:
                resp.release()
            doc = json.loads(body)
            for obj in doc.get("items") or []:
                items[obj["metadata"]["name"]] = obj
            meta = doc.get("metadata") or {}
            token = meta.get("continue") or None
            if token is None:
                break
        self.items = items
        self.resource_version = str(meta["resourceVersion"])
        self.stats.lists += 1
        self.synced.set()
        self.on_change()

    async def _watch(self) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException
        from kubernetes_asyncio.watch import Watch

        timeout = int(self.cfg.watch_timeout_s * random.uniform(1.0, 1.2))  # spread renewals
        self.stats.watches += 1
        async with Watch(return_type="object") as watch:
            stream = watch.stream(
                self.list_call,
                **self.params,
                resource_version=self.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=max(1, timeout),
                _request_timeout=(10.0, timeout + 30.0),  # a silent connection is a dead one
            )
            try:
                async for ev in stream:
                    self._event(ev)
            except ApiException as exc:
                if exc.status == 410:
                    raise Gone() from None
                raise

    def _event(self, ev: Any) -> None:
        if not isinstance(ev, dict) or not isinstance(ev.get("raw_object"), dict):
            raise ConnectionError("watch stream broke mid-event")  # a cut line: retry from the last version
        typ, obj = ev.get("type"), ev["raw_object"]
        meta = obj.get("metadata") or {}
        rv = meta.get("resourceVersion")
        if typ == "BOOKMARK":
            self.stats.bookmarks += 1
        elif typ in ("ADDED", "MODIFIED"):
            self.items[meta["name"]] = obj
            self.stats.events += 1
        elif typ == "DELETED":
            self.items.pop(meta["name"], None)
            self.stats.events += 1
        else:
            raise ConnectionError(f"unexpected watch event type {typ!r}")
        if rv:
            self.resource_version = str(rv)
        if typ != "BOOKMARK":
            self.on_change()


# -- the client -----------------------------------------------------------------------------------


async def make_api_client(cfg: DiscoveryConfig) -> tuple[Any, str | None]:
    """A kubernetes_asyncio ApiClient (kubeconfig when one is named, else in cluster when
    running in a pod, else $KUBECONFIG / ~/.kube/config), and the namespace its config names."""
    try:
        from kubernetes_asyncio import client
        from kubernetes_asyncio import config as kconfig
    except ImportError:
        raise DiscoveryError("discovery needs the Kubernetes client: pip install 'kvgate[k8s]' (kubernetes-asyncio)") from None
    conf = client.Configuration()
    namespace = None
    try:
        if cfg.kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            kconfig.load_incluster_config(
                client_configuration=conf, token_filename=f"{SERVICE_ACCOUNT_DIR}/token", cert_filename=f"{SERVICE_ACCOUNT_DIR}/ca.crt"
            )
            namespace = _pod_namespace()
        else:
            path = cfg.kubeconfig or os.environ.get("KUBECONFIG") or _home_kubeconfig()
            loader = await kconfig.load_kube_config(config_file=path, context=cfg.context, client_configuration=conf, persist_config=False)
            namespace = ((loader.current_context or {}).get("context") or {}).get("namespace")
    except (kconfig.ConfigException, OSError) as exc:
        raise DiscoveryError(f"discovery: no usable Kubernetes configuration ({exc})") from None
    return client.ApiClient(configuration=conf), namespace


def _pod_namespace() -> str | None:
    """The namespace of the pod we run in (its service account's), if readable."""
    try:
        with open(f"{SERVICE_ACCOUNT_DIR}/namespace") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _home_kubeconfig() -> str:
    return os.path.expanduser("~/.kube/config")


# -- the fleet kept in step -----------------------------------------------------------------------


@dataclass
class _Counts:
    added: int = 0
    removed: int = 0
    restarted: int = 0
    updated: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # pod uid -> why (logged once)


class Discovery:
    """Keeps ``gw.fleet`` (and the KV-event subscriber) equal to the selected pods.

    ``cfg``: the discovery section (default: ``gw.cfg.discovery``). ``roles``: only pods of
    these roles (the sidecar: prefill and both); others are not replicas here. ``data_parallel``:
    expand pods with several ranks into one replica per rank (the sidecar calls a pod's API
    server as a whole, leaving the rank to vLLM). ``reprobe``: ask a pod whose model is still
    unknown again every health interval (the gateway's fleet probes every replica anyway; the
    indexer's fleet has no probe loop). ``on_change`` callbacks run after every reconcile."""

    def __init__(
        self,
        gw: DiscoveryHost,
        *,
        cfg: DiscoveryConfig | None = None,
        roles: Collection[str] | None = None,
        data_parallel: bool = True,
        reprobe: bool = False,
    ) -> None:
        dcfg = cfg or gw.cfg.discovery
        assert dcfg is not None
        self.gw = gw
        self.cfg: DiscoveryConfig = dcfg
        self.roles = frozenset(roles) if roles is not None else None
        self.data_parallel = data_parallel
        self.reprobe = reprobe
        self.on_change: list[Callable[[], None]] = []
        self.static_ids = {r.id for r in gw.cfg.replicas}
        self.namespace = self.cfg.namespace or "default"
        self.current: dict[str, PodReplica] = {}
        self.counts = _Counts()
        self.pods: Reflector | None = None
        self.pool: Reflector | None = None
        self.pool_port: int | None = None
        self._pool_selector: tuple[str, int | None] | str | None = "unset"
        self._fallback: dict[str, dict[str, Any]] = {}  # the previous selector's pods, until the new list
        self._sources: dict[str, tuple[str, str | None, str]] = {}  # replica -> (events, replay, model) subscribed
        self._dirty = asyncio.Event()
        self._synced = asyncio.Event()
        self._api: Any = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._probes: set[asyncio.Task[None]] = set()
        self._probing: dict[str, float] = {}  # replica -> when its last probe started (reprobe)

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, start watching, and wait (up to ``initial_sync_timeout_s``) for the first
        pod list to be in the fleet; the watches go on in the background either way."""
        from kubernetes_asyncio import client

        self._api, namespace = await make_api_client(self.cfg)
        if self.cfg.namespace is None:
            self.namespace = namespace or "default"
        self.gw.metrics.add_live(self._live_metrics)
        self._tasks["reconcile"] = asyncio.create_task(self._reconcile_loop())
        if self.cfg.kind == "pods":
            self._watch_pods(self.cfg.label_selector or DEFAULT_POD_SELECTOR)
        else:
            api = client.CustomObjectsApi(self._api)
            group, version = self.cfg.inference_pool_api.split("/")
            list_call = _bind(api.list_namespaced_custom_object, group, version, self.namespace, "inferencepools")
            params = {"field_selector": f"metadata.name={self.cfg.inference_pool}"}
            self.pool = Reflector(f"inferencepool {self.namespace}/{self.cfg.inference_pool}", list_call, params, self._pool_changed, self.cfg)
            self._tasks["pool"] = asyncio.create_task(self.pool.run())
        try:
            await asyncio.wait_for(self._synced.wait(), self.cfg.initial_sync_timeout_s)
        except TimeoutError:
            log.warning(
                "discovery: no pod list from the Kubernetes API after %.0f s; serving the replicas known so far, still trying", self.cfg.initial_sync_timeout_s
            )

    @property
    def synced(self) -> bool:
        """The first pod list has been reconciled (or there is no pool, hence no pods)."""
        return self._synced.is_set()

    async def stop(self) -> None:
        tasks = [*self._tasks.values(), *self._probes]
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._api is not None:
            with contextlib.suppress(Exception):
                await self._api.close()

    def _watch_pods(self, selector: str | None) -> None:
        """(Re)start the pod reflector with ``selector`` (None: no pods at all)."""
        from kubernetes_asyncio import client

        old = self._tasks.pop("pods", None)
        if old is not None:
            old.cancel()
        if self.pods is not None:
            self._fallback = self.pods.items if self.pods.synced.is_set() else self._fallback
        if selector is None:
            self.pods = None
            self._fallback = {}
            self._dirty.set()
            return
        api = client.CoreV1Api(self._api)
        self.pods = Reflector(
            f"pods {self.namespace} [{selector}]", _bind(api.list_namespaced_pod, self.namespace), {"label_selector": selector}, self._dirty.set, self.cfg
        )
        self._tasks["pods"] = asyncio.create_task(self.pods.run())

    def _pool_changed(self) -> None:
        """The pool was listed or changed: follow its selector and port."""
        assert self.pool is not None
        obj = self.pool.items.get(self.cfg.inference_pool or "")
        want: tuple[str, int | None] | None = None
        if obj is not None:
            labels, port = pool_target(obj)
            if not labels:
                log.warning("discovery: InferencePool %s has an empty selector; selecting no pods", self.cfg.inference_pool)
            else:
                parts = [f"{k}={v}" for k, v in sorted(labels.items())]
                if self.cfg.label_selector:
                    parts.append(self.cfg.label_selector)
                want = (",".join(parts), port)
        if want == self._pool_selector:
            return
        log.warning(
            "discovery: InferencePool %s/%s %s",
            self.namespace,
            self.cfg.inference_pool,
            f"selects [{want[0]}] on port {want[1]}" if want else "is absent: no pods",
        )
        self._pool_selector = want
        self.pool_port = want[1] if want else None
        self._watch_pods(want[0] if want else None)
        if want is None:
            self._synced.set()  # nothing to wait for

    # -- reconciling ------------------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        # also every health interval: a pod whose models the fleet's probe has learnt since
        # gets its KV-event subscription
        every = self.gw.cfg.health.interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), every)
            self._dirty.clear()
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must outlive any one failure
                log.exception("discovery: reconcile failed")

    def desired(self) -> dict[str, PodReplica]:
        """The replicas the selected pods stand for now."""
        if self.pods is None:
            items: Iterable[dict[str, Any]] = ()
        elif self.pods.synced.is_set():
            items = self.pods.items.values()
        else:
            items = self._fallback.values()
        out: dict[str, PodReplica] = {}
        skipped: dict[str, str] = {}
        for pod in items:
            uid = (pod.get("metadata") or {}).get("uid", "")
            try:
                p = pod_replica(pod, self.cfg, self.pool_port)
            except PodSkipped as exc:
                skipped[uid] = f"pod {pod['metadata'].get('name')} skipped: {exc}"
                continue
            if p is None or (self.roles is not None and p.role not in self.roles):
                continue
            replicas = expand_pod(p) if self.data_parallel else [p]
            clash = next((r.id for r in replicas if r.id in self.static_ids), None)
            if clash is not None:
                skipped[uid] = f"pod {p.id} skipped: a static replica has the id {clash}"
                continue
            out.update((r.id, r) for r in replicas)
        for uid, why in skipped.items():
            if self.counts.skipped.get(uid) != why:
                log.warning("discovery: %s", why)
        self.counts.skipped = skipped
        return out

    async def reconcile(self) -> None:
        desired = self.desired()
        for rid in [r for r in self.current if r not in desired]:
            await self._remove(rid)
            self.counts.removed += 1
            log.warning("discovery: replica %s removed (pod gone or no longer selected)", rid)
        fleet = self.gw.fleet
        for rid, p in desired.items():
            cur = self.current.get(rid)
            if cur is None:
                self._add(p)
                self.counts.added += 1
                log.warning("discovery: replica %s added (%s, role %s%s)", rid, p.url, p.role, "" if p.ready else ", not ready")
            elif cur.identity != p.identity:
                old = await self._remove(rid)
                self._add(p, carry=old)
                self.counts.restarted += 1
                log.warning("discovery: replica %s replaced (new pod or address: %s): circuit, KV events and index start over", rid, p.url)
            else:
                if (cur.role, cur.models, cur.labels) != (p.role, p.models, p.labels):
                    fleet.update(self._replica_config(p))
                    self.counts.updated += 1
                    if cur.role != p.role:
                        log.warning("discovery: replica %s role %s -> %s", rid, cur.role, p.role)
                if p.restarts > cur.restarts:
                    fleet.reset_circuit(rid)
                if cur.ready != p.ready:
                    fleet.set_ready(rid, p.ready)
                    if p.ready:
                        self._probe(rid)
                self.current[rid] = p
        await self._sync_sources()
        if self.pods is not None and self.pods.synced.is_set():
            self._synced.set()
        for cb in self.on_change:
            cb()

    def _replica_config(self, p: PodReplica) -> ReplicaConfig:
        return ReplicaConfig(
            id=p.id,
            url=p.url,
            role=p.role,  # type: ignore[arg-type]  # checked against ROLES
            models=list(p.models),
            kv_events=p.kv_events,
            replay=p.replay,
            topic=self.cfg.topic,
            prefill_tokens_per_s=self.cfg.prefill_tokens_per_s,
            labels=dict(p.labels),
            api_key_env=self.cfg.api_key_env,
            data_parallel_rank=p.data_parallel_rank,
        )

    def _add(self, p: PodReplica, carry: EndpointState | None = None) -> None:
        fleet = self.gw.fleet
        fleet.add(self._replica_config(p))
        fleet.set_ready(p.id, p.ready)
        state = fleet.get(p.id)
        if carry is not None and state is not None:
            # requests sent to the old pod still end under this id: count them here, so their
            # end balances (the old pod's answers, or failures, come back as they would)
            state.inflight_requests = carry.inflight_requests
            state.inflight_prefill_tokens = carry.inflight_prefill_tokens
            state.inflight_decode_tokens = carry.inflight_decode_tokens
        self.current[p.id] = p
        if p.ready:
            self._probe(p.id)

    def _probe(self, rid: str) -> None:
        """Probe a new or newly ready replica at once (models, health), then reconcile again
        (its KV-event subscription may wait for its models)."""

        self._probing[rid] = time.monotonic()

        async def probe() -> None:
            await self.gw.fleet.probe(rid)
            self._dirty.set()

        task = asyncio.create_task(probe())
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _remove(self, rid: str) -> EndpointState | None:
        self.current.pop(rid, None)
        self._probing.pop(rid, None)
        state = self.gw.fleet.remove(rid)
        if self._sources.pop(rid, None) is not None and self.gw.subscriber is not None:
            await self.gw.subscriber.remove_source(rid, forget=True)  # stops ingestion, drops its index entries
        return state

    async def _sync_sources(self) -> None:
        """A KV-event subscription per replica that publishes events and whose model is known."""
        sub = self.gw.subscriber
        if sub is None:
            return
        for rid, p in list(self.current.items()):
            if p.kv_events is None:
                continue
            state = self.gw.fleet.get(rid)
            model = p.models[0] if p.models else (sorted(state.models)[0] if state is not None and state.models else None)
            if model is None:  # its /v1/models has not answered yet
                if self.reprobe and p.ready and time.monotonic() - self._probing.get(rid, 0.0) >= self.gw.cfg.health.interval_s:
                    self._probe(rid)
                continue
            want = (p.kv_events, p.replay, model)
            have = self._sources.get(rid)
            if have == want:
                continue
            if have is not None:  # another model: its entries were keyed under the old one
                await sub.remove_source(rid, forget=True)
            await sub.add_source(ReplicaSource(replica=rid, model=model, endpoint=p.kv_events, replay_endpoint=p.replay, topic=self.cfg.topic))
            self._sources[rid] = want

    # -- metrics ----------------------------------------------------------------------------------

    def _reflectors(self) -> list[tuple[str, Reflector]]:
        out = [("pods", self.pods)] if self.pods is not None else []
        if self.pool is not None:
            out.append(("inferencepool", self.pool))
        return out

    def _live_metrics(self):
        ready = sum(1 for p in self.current.values() if p.ready)
        yield gauge(
            "kvgate_discovery_replicas",
            "Replicas discovered in Kubernetes, by readiness",
            ["ready"],
            [(["true"], float(ready)), (["false"], float(len(self.current) - ready))],
        )
        c = self.counts
        yield counter(
            "kvgate_discovery_changes",
            "Fleet changes made by discovery",
            ["change"],
            [(["added"], float(c.added)), (["removed"], float(c.removed)), (["replaced"], float(c.restarted)), (["updated"], float(c.updated))],
        )
        refl = self._reflectors()
        for name, attr, doc in (
            ("kvgate_discovery_lists", "lists", "Complete lists from the Kubernetes API (first one, and after each 410 Gone)"),
            ("kvgate_discovery_watches", "watches", "Watch requests made (renewals and retries included)"),
            ("kvgate_discovery_expired", "expired", "410 Gone answers (resourceVersion compacted): relisted"),
            ("kvgate_discovery_errors", "errors", "Failed lists and dropped or failed watches (retried after a backoff)"),
        ):
            yield counter(name, doc, ["resource"], (([n], float(getattr(r.stats, attr))) for n, r in refl))


def _bind(fn: Callable[..., Any], *args: Any) -> Callable[..., Any]:
    """``fn`` with its leading positional arguments bound, keeping its docstring: the
    client's Watch reads the return type and the watch flag's name from it."""

    def call(**kw: Any) -> Any:
        return fn(*args, **kw)

    call.__doc__ = fn.__doc__
    return call
