"""A loopback Kubernetes API server that speaks the real list/watch protocol (for discovery tests).

Only what a controller's list+watch touches, but that part as the API server does it:

* ``GET /api/v1/namespaces/{ns}/pods`` and
  ``GET /apis/{group}/{version}/namespaces/{ns}/inferencepools`` (both GIE groups): a list
  (``kind: PodList``, ``metadata.resourceVersion``; ``limit``/``continue`` pages served from one
  snapshot, a continue token that outlived ``expire()`` answers 410), or with ``watch=1`` a
  stream of newline-delimited JSON watch events (ADDED / MODIFIED / DELETED / BOOKMARK / ERROR);
* ``labelSelector`` (``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``, ``k in (a,b)``, ``k notin (a,b)``)
  and ``fieldSelector`` ``metadata.name=...``, evaluated here; a selected watch sees an object
  that starts or stops matching as ADDED or DELETED, as from the real server;
* one resourceVersion counter for every object; a watch from version N replays what changed
  after N, from none or "0" starts with an ADDED per object; ``expire()`` compacts the history
  so that older versions get 410 Gone: an ERROR event with a Status of code 410 (the API
  server's way) or, with ``gone_mode = "http"``, an HTTP 410;
* ``allowWatchBookmarks=true`` lets ``bookmark()`` send BOOKMARK events; ``timeoutSeconds``
  ends a watch cleanly; ``drop_watches()`` aborts the open ones (optionally mid-line);
* a bearer token checked on every request (the tests' kubeconfig carries it).

Runs on its own event loop in a daemon thread, on a port 0 socket; the mutators (``apply``,
``delete``, ...) may be called from any thread. Every request is recorded in ``requests``.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.helpers.net import bound_socket

POOL_GROUPS = {"inference.networking.k8s.io": "v1", "inference.networking.x-k8s.io": "v1alpha2"}
KINDS = {"pods": ("Pod", "v1"), "inferencepools": ("InferencePool", None)}


def go_bool(value: str | None) -> bool:
    """A query flag as the API server parses it (Go's strconv.ParseBool: "true", "True", "1", ...)."""
    return value in ("1", "t", "T", "true", "True", "TRUE")


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code}


# -- selectors ----------------------------------------------------------------------------------


def _split(selector: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in selector:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "("
        depth -= ch == ")"
        cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def label_matcher(selector: str | None) -> Callable[[dict[str, str]], bool]:
    """The API server's label-selector semantics for the forms controllers use."""
    tests: list[Callable[[dict[str, str]], bool]] = []
    for req in _split(selector or ""):
        if " notin " in req or " in " in req:
            neg = " notin " in req
            key, _, values = req.partition(" notin " if neg else " in ")
            allowed = {v.strip() for v in values.strip().strip("()").split(",")}
            k = key.strip()
            tests.append(lambda lb, k=k, a=allowed, n=neg: (lb.get(k) not in a) if n else (lb.get(k) in a))
        elif "!=" in req:
            k, _, v = req.partition("!=")
            tests.append(lambda lb, k=k.strip(), v=v.strip(): lb.get(k) != v)
        elif "=" in req:
            k, _, v = req.replace("==", "=").partition("=")
            tests.append(lambda lb, k=k.strip(), v=v.strip(): lb.get(k) == v)
        elif req.startswith("!"):
            tests.append(lambda lb, k=req[1:].strip(): k not in lb)
        else:
            tests.append(lambda lb, k=req: k in lb)
    return lambda labels: all(t(labels) for t in tests)


def field_matcher(selector: str | None) -> Callable[[dict[str, Any]], bool]:
    tests = []
    for req in _split(selector or ""):
        path, _, value = req.replace("==", "=").partition("=")
        if path.strip() != "metadata.name":
            raise ValueError(f"field selector {path!r} not supported here")
        tests.append(value.strip())
    return lambda obj: all(obj["metadata"]["name"] == v for v in tests)


# -- objects ------------------------------------------------------------------------------------


def make_pod(
    name: str,
    *,
    namespace: str = "default",
    ip: str | None = "127.0.0.1",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    ready: bool = True,
    phase: str = "Running",
    restarts: int = 0,
    uid: str | None = None,
) -> dict[str, Any]:
    """A pod as the API server returns it (the fields discovery reads, and some it must skip)."""
    conditions = [
        {"type": "PodScheduled", "status": "True"},
        {"type": "Initialized", "status": "True"},
        {"type": "ContainersReady", "status": "True" if ready else "False"},
        {"type": "Ready", "status": "True" if ready else "False"},
    ]
    pod: dict[str, Any] = {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid or str(uuid.uuid4()),
            "labels": dict(labels or {}),
            "annotations": dict(annotations or {}),
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai", "ports": [{"containerPort": 8000, "protocol": "TCP"}]}]},
        "status": {
            "phase": phase,
            "conditions": conditions,
            "containerStatuses": [{"name": "vllm", "ready": ready, "restartCount": restarts}],
        },
    }
    if ip is not None:
        pod["status"]["podIP"] = ip
        pod["status"]["podIPs"] = [{"ip": ip}]
    return pod


def make_pool(name: str, match_labels: dict[str, str], port: int, *, namespace: str = "default", api: str = "v1") -> dict[str, Any]:
    """An InferencePool: v1 (``selector.matchLabels``, ``targetPorts``) or v1alpha2 (flat
    ``selector``, ``targetPortNumber``), as GIE's API types define them."""
    if api == "v1":
        spec: dict[str, Any] = {
            "selector": {"matchLabels": dict(match_labels)},
            "targetPorts": [{"number": port}],
            "endpointPickerRef": {"name": f"{name}-epp", "kind": "Service", "portNumber": 9002},
        }
        api_version = "inference.networking.k8s.io/v1"
    else:
        spec = {"selector": dict(match_labels), "targetPortNumber": port, "extensionRef": {"name": f"{name}-epp"}}
        api_version = "inference.networking.x-k8s.io/v1alpha2"
    return {"kind": "InferencePool", "apiVersion": api_version, "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4())}, "spec": spec}


@dataclass(eq=False)  # hashable by identity: the server keeps a set of open watches
class _Watch:
    kind: str
    namespace: str
    labels: Callable[[dict[str, str]], bool]
    fields: Callable[[dict[str, Any]], bool]
    bookmarks: bool
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def matches(self, obj: dict[str, Any] | None) -> bool:
        return obj is not None and obj["metadata"].get("namespace") == self.namespace and self.labels(obj["metadata"].get("labels") or {}) and self.fields(obj)

    def translate(self, typ: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> tuple[str, dict[str, Any]] | None:
        """What this watch sees of one change (a selected watch: entering = ADDED, leaving = DELETED)."""
        was, now = self.matches(old), self.matches(new)
        if typ == "DELETED":
            return ("DELETED", new or old) if was else None  # type: ignore[return-value]
        if was and now:
            return ("MODIFIED", new)  # type: ignore[return-value]
        if now:
            return ("ADDED", new)  # type: ignore[return-value]
        if was:
            return ("DELETED", new)  # type: ignore[return-value]
        return None


class FakeKubeAPI:
    """See the module docstring. ``with FakeKubeAPI() as api: api.apply("pods", make_pod(...))``."""

    def __init__(self, token: str = "kvgate-test-token", ssl_context: ssl.SSLContext | None = None) -> None:
        self.token = token
        self.ssl_context = ssl_context  # serve HTTPS (the in-cluster address is https://)
        self.unavailable = False  # every request answers 503 (an API server restarting)
        self.rv = 100  # resourceVersions are opaque strings to clients; here a counter
        self.compacted = 0  # versions below this are gone from the history (410)
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {k: {} for k in KINDS}
        self.history: list[tuple[int, str, str, dict[str, Any] | None, dict[str, Any] | None]] = []
        self.watches: set[_Watch] = set()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.gone_mode = "event"  # or "http"
        self._pages: dict[str, tuple[int, list[dict[str, Any]]]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sock = bound_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._pods)
        app.router.add_get("/apis/{group}/{version}/namespaces/{ns}/inferencepools", self._pools)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
        self.loop.run_until_complete(self._runner.setup())
        self.loop.run_until_complete(web.SockSite(self._runner, self.sock, ssl_context=self.ssl_context).start())
        self._started.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self._runner.cleanup())
        self.loop.close()

    def start(self) -> FakeKubeAPI:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("fake Kubernetes API did not start")
        return self

    def stop(self) -> None:
        if self.loop is not None and self._thread.is_alive():
            self.drop_watches()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def __enter__(self) -> FakeKubeAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kubeconfig(self, directory: Path, namespace: str = "default") -> Path:
        """A kubeconfig file pointing at this server, with its bearer token."""
        path = directory / "kubeconfig"
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": self.token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester", "namespace": namespace}}],
            "current-context": "fake",
        }
        path.write_text(json.dumps(doc))  # JSON is YAML
        return path

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the server's loop (the store is only touched there) and return its result."""
        assert self.loop is not None

        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    # -- mutators (any thread) ----------------------------------------------------------------------

    def apply(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace an object (ADDED or MODIFIED); returns it with its new resourceVersion."""
        return self._call(self._apply, kind, copy.deepcopy(obj))

    def delete(self, kind: str, name: str, namespace: str = "default") -> None:
        self._call(self._delete, kind, namespace, name)

    def get(self, kind: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
        return copy.deepcopy(self._call(lambda: self.objects[kind].get((namespace, name))))

    def patch(self, kind: str, name: str, change: Callable[[dict[str, Any]], None], namespace: str = "default") -> dict[str, Any]:
        """Change an object with ``change(obj)`` (a copy), then store it as MODIFIED."""
        obj = self.get(kind, name, namespace)
        assert obj is not None, f"no {kind} {namespace}/{name}"
        change(obj)
        return self.apply(kind, obj)

    def expire(self) -> None:
        """Compact the history at the current version: watches from older versions and every
        continue token get 410 Gone."""
        self._call(self._expire)

    def bookmark(self) -> int:
        """Send a BOOKMARK at the current version to every watch that allows them; that version."""
        return self._call(self._bookmark)

    def drop_watches(self, partial: bool = False) -> int:
        """Abort every open watch connection (``partial``: after half an event line); how many."""
        return self._call(self._drop, partial)

    def open_watches(self, kind: str | None = None) -> int:
        return self._call(lambda: sum(1 for w in self.watches if kind is None or w.kind == kind))

    def watch_requests(self, kind: str) -> list[dict[str, str]]:
        return [q for _, path, q in list(self.requests) if path.endswith("/" + kind) and go_bool(q.get("watch"))]

    def list_requests(self, kind: str) -> list[dict[str, str]]:
        return [q for _, path, q in list(self.requests) if path.endswith("/" + kind) and not go_bool(q.get("watch"))]

    # -- the store (server loop only) -----------------------------------------------------------

    def _bump(self) -> int:
        self.rv += 1
        return self.rv

    def _record(self, kind: str, typ: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        rv = int((new or old or {})["metadata"]["resourceVersion"])
        self.history.append((rv, kind, typ, old, new))
        for w in list(self.watches):
            if w.kind == kind:
                seen = w.translate(typ, old, new)
                if seen is not None:
                    w.queue.put_nowait({"type": seen[0], "object": seen[1]})

    def _apply(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        meta.setdefault("namespace", "default")
        meta.setdefault("uid", str(uuid.uuid4()))
        key = (meta["namespace"], meta["name"])
        old = self.objects[kind].get(key)
        meta["resourceVersion"] = str(self._bump())
        self.objects[kind][key] = obj
        self._record(kind, "MODIFIED" if old is not None else "ADDED", old, obj)
        return copy.deepcopy(obj)

    def _delete(self, kind: str, namespace: str, name: str) -> None:
        old = self.objects[kind].pop((namespace, name), None)
        if old is None:
            return
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self._bump())
        self._record(kind, "DELETED", old, gone)

    def _expire(self) -> None:
        self.compacted = self.rv  # as etcd compacts at a revision: watching from it still works
        self.history = [h for h in self.history if h[0] > self.compacted]
        self._pages.clear()

    def _bookmark(self) -> int:
        for w in self.watches:
            if w.bookmarks:
                kind_name, api_version = KINDS[w.kind]
                w.queue.put_nowait(
                    {"type": "BOOKMARK", "object": {"kind": kind_name, "apiVersion": api_version or "v1", "metadata": {"resourceVersion": str(self.rv)}}}
                )
        return self.rv

    def _drop(self, partial: bool) -> int:
        for w in self.watches:
            w.queue.put_nowait({"type": "__drop__", "partial": partial})
        return len(self.watches)

    # -- HTTP -------------------------------------------------------------------------------------

    def _auth(self, request: web.Request) -> web.Response | None:
        self.requests.append((request.method, request.path, dict(request.query)))
        if self.unavailable:
            return web.json_response(status(503, "ServiceUnavailable", "the API server is restarting"), status=503)
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return web.json_response(status(401, "Unauthorized", "Unauthorized"), status=401)
        return None

    async def _pods(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "pods", "v1", "PodList")

    async def _pools(self, request: web.Request) -> web.StreamResponse:
        group, version = request.match_info["group"], request.match_info["version"]
        if POOL_GROUPS.get(group) != version:
            self.requests.append((request.method, request.path, dict(request.query)))
            return web.json_response(status(404, "NotFound", f"the server could not find the requested resource ({group}/{version})"), status=404)
        return await self._serve(request, "inferencepools", f"{group}/{version}", "InferencePoolList")

    async def _serve(self, request: web.Request, kind: str, api_version: str, list_kind: str) -> web.StreamResponse:
        denied = self._auth(request)
        if denied is not None:
            return denied
        q = request.query
        ns = request.match_info["ns"]
        try:
            labels, fields = label_matcher(q.get("labelSelector")), field_matcher(q.get("fieldSelector"))
        except ValueError as exc:
            return web.json_response(status(400, "BadRequest", str(exc)), status=400)
        w = _Watch(kind, ns, labels, fields, go_bool(q.get("allowWatchBookmarks")))
        if go_bool(q.get("watch")):
            return await self._watch(request, w, q.get("resourceVersion"), float(q.get("timeoutSeconds") or 3600))
        return self._list(w, api_version, list_kind, q)

    def _list(self, w: _Watch, api_version: str, list_kind: str, q: Any) -> web.Response:
        token = q.get("continue")
        if token:
            page = self._pages.pop(token, None)
            if page is None:
                msg = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter."
                return web.json_response(status(410, "Expired", msg), status=410)
            rv, items = page
        else:
            rv, items = self.rv, sorted((copy.deepcopy(o) for o in self.objects[w.kind].values() if w.matches(o)), key=lambda o: o["metadata"]["name"])
        limit = int(q.get("limit") or 0)
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if limit and len(items) > limit:
            nxt = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode()
            self._pages[nxt] = (rv, items[limit:])
            items = items[:limit]
            meta["continue"] = nxt
            meta["remainingItemCount"] = len(self._pages[nxt][1])
        return web.json_response({"kind": list_kind, "apiVersion": api_version, "metadata": meta, "items": items})

    async def _watch(self, request: web.Request, w: _Watch, rv: str | None, timeout: float) -> web.StreamResponse:
        since = int(rv) if rv not in (None, "", "0") else None
        if since is not None and since < self.compacted:
            gone = status(410, "Expired", f"too old resource version: {since} ({self.compacted})")
            if self.gone_mode == "http":
                return web.json_response(gone, status=410)
            resp = web.StreamResponse(headers={"content-type": "application/json"})
            await resp.prepare(request)
            await resp.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
            await resp.write_eof()
            return resp
        # the backlog is computed and the watch registered with no await between: nothing is missed
        if since is None:
            backlog = [{"type": "ADDED", "object": copy.deepcopy(o)} for o in self.objects[w.kind].values() if w.matches(o)]
        else:
            backlog = []
            for h_rv, kind, typ, old, new in self.history:
                if kind == w.kind and h_rv > since:
                    seen = w.translate(typ, old, new)
                    if seen is not None:
                        backlog.append({"type": seen[0], "object": copy.deepcopy(seen[1])})
        for ev in backlog:
            w.queue.put_nowait(ev)
        self.watches.add(w)
        resp = web.StreamResponse(headers={"content-type": "application/json"})
        try:
            await resp.prepare(request)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    ev = await asyncio.wait_for(w.queue.get(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    break  # timeoutSeconds: the server ends the watch cleanly
                if ev["type"] == "__drop__":
                    line = json.dumps({"type": "ADDED", "object": {"metadata": {"name": "x"}}}).encode()
                    if ev["partial"]:
                        await resp.write(line[: len(line) // 2])
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
                await resp.write(json.dumps(ev).encode() + b"\n")
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.watches.discard(w)
        return resp
