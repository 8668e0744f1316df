"""Replicas discovered in Kubernetes: the real kubernetes_asyncio client against a loopback API
server that speaks the list/watch protocol (tests/helpers/kube_api.py), then a running gateway
in front of simulated vLLM replicas whose pods come, go, change role and restart.

The simulators bind port 0, so every pod carries its simulator's ports in the kvgate.io/*
annotations (the documented per-pod override); every pod IP is 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from gateway import discovery as disc
from gateway.config import ConfigError, parse_config
from gateway.discovery import PodSkipped, Reflector, _bind, make_api_client, pod_replica, pool_target
from simulator.fleet import SimConfig, SimFleet
from tests.helpers.gateway import MODEL, GatewayThread, fleet_config, get_metrics, metric_value, wait_for
from tests.helpers.kube_api import FakeKubeAPI, make_pod, make_pool
from tests.helpers.net import free_port

# -- pods as replicas (no server) -----------------------------------------------------------------


def dcfg(**kw: Any):
    return parse_config({"discovery": kw}).discovery


def test_pod_to_replica_role_ports_models_readiness():
    cfg = dcfg()
    pod = make_pod("vllm-0", ip="10.1.2.3", labels={"llm-d.ai/role": "prefill"})
    p = pod_replica(pod, cfg)
    assert p is not None
    assert (p.id, p.url, p.kv_events, p.replay, p.role, p.models, p.ready) == (
        "vllm-0",
        "http://10.1.2.3:8000",
        "tcp://10.1.2.3:5557",
        "tcp://10.1.2.3:5558",
        "prefill",
        (),
        True,
    )
    # annotations override the ports and name the models; no role label = default_role
    ann = {"kvgate.io/port": "8200", "kvgate.io/kv-events-port": "6000", "kvgate.io/replay-port": "none", "kvgate.io/models": "Qwen/Qwen3-8B, x"}
    p = pod_replica(make_pod("a", ip="10.0.0.9", annotations=ann), dcfg(default_role="decode"))
    assert p is not None and (p.url, p.kv_events, p.replay, p.role, p.models) == (
        "http://10.0.0.9:8200",
        "tcp://10.0.0.9:6000",
        None,
        "decode",
        ("Qwen/Qwen3-8B", "x"),
    )
    # no events at all: no replay either
    p = pod_replica(make_pod("a", annotations={"kvgate.io/kv-events-port": "none"}), cfg)
    assert p is not None and p.kv_events is None and p.replay is None
    # an InferencePool's target port replaces the configured one; the annotation still wins
    assert pod_replica(make_pod("a"), cfg, pool_port=9000).url == "http://127.0.0.1:9000"  # type: ignore[union-attr]
    assert pod_replica(make_pod("a", annotations={"kvgate.io/port": "81"}), cfg, pool_port=9000).url == "http://127.0.0.1:81"  # type: ignore[union-attr]
    # model from a configured label, then from `models`
    assert pod_replica(make_pod("a", labels={"app.kubernetes.io/model": "m1"}), dcfg(model_label="app.kubernetes.io/model")).models == ("m1",)  # type: ignore[union-attr]
    assert pod_replica(make_pod("a"), dcfg(models=["m2"])).models == ("m2",)  # type: ignore[union-attr]
    # IPv6 pod IPs are bracketed
    assert pod_replica(make_pod("a", ip="fd00::5"), cfg).url == "http://[fd00::5]:8000"  # type: ignore[union-attr]
    # readiness: the Ready condition, Running, not being deleted
    assert pod_replica(make_pod("a", ready=False), cfg).ready is False  # type: ignore[union-attr]
    terminating = make_pod("a")
    terminating["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    assert pod_replica(terminating, cfg).ready is False  # type: ignore[union-attr]
    # no IP yet, or finished: no replica
    assert pod_replica(make_pod("a", ip=None), cfg) is None
    assert pod_replica(make_pod("a", phase="Succeeded"), cfg) is None
    # selected but unusable: said why
    with pytest.raises(PodSkipped, match=r"llm-d\.ai/role"):
        pod_replica(make_pod("a", labels={"llm-d.ai/role": "encode"}), cfg)
    with pytest.raises(PodSkipped, match=r"kvgate\.io/port"):
        pod_replica(make_pod("a", annotations={"kvgate.io/port": "http"}), cfg)


def test_inference_pool_shapes():
    assert pool_target(make_pool("p", {"app": "vllm"}, 8000)) == ({"app": "vllm"}, 8000)
    assert pool_target(make_pool("p", {"app": "vllm", "tier": "a"}, 8001, api="v1alpha2")) == ({"app": "vllm", "tier": "a"}, 8001)


def test_discovery_config_is_validated():
    cfg = parse_config({"discovery": {}})
    assert cfg.discovery is not None and cfg.discovery.kind == "pods" and cfg.replicas == []
    assert parse_config({}).discovery is None
    for bad, where in (
        ({"kind": "inferencepool"}, "inference_pool"),
        ({"inference_pool": "p"}, "inference_pool"),
        ({"kv_events_port": 70000}, "kv_events_port"),
        ({"watch_timeout_s": 0}, "watch_timeout_s"),
        ({"api_key_env": "KVGATE_TEST_NO_SUCH_VAR"}, "api_key_env"),
        ({"kind": "services"}, "kind"),
        ({"selector": "a=b"}, "selector"),
    ):
        with pytest.raises(ConfigError, match=where):
            parse_config({"discovery": bad})


async def test_fleet_membership_readiness_and_circuits():
    """What discovery asks of the fleet: readiness overrides the circuit, a reset closes it,
    an update keeps the counters, a removal leaves requests holding the state unhealthy."""
    from gateway.config import HealthConfig, ReplicaConfig
    from gateway.fleet import Fleet

    async with httpx.AsyncClient() as http:
        fleet = Fleet([], http, HealthConfig(failure_threshold=1))
        fleet.add(ReplicaConfig(id="p", url="http://10.0.0.1:8000", models=["m"]))
        state = fleet.get("p")
        assert state is not None and state.healthy
        fleet.dispatched("p", 10, 20)
        fleet.set_ready("p", False)
        assert not state.healthy
        fleet.record_success("p")  # a good probe does not make an unready pod routable
        assert not state.healthy
        fleet.set_ready("p", True)
        assert state.healthy
        fleet.record_failure("p")
        assert not state.healthy
        fleet.set_ready("p", True)  # ready, but its circuit is open
        assert not state.healthy
        fleet.reset_circuit("p")  # restarted: old failures say nothing
        assert state.healthy
        models = fleet.models()
        fleet.update(ReplicaConfig(id="p", url="http://10.0.0.1:8000", role="decode", models=["m2"], labels={"a": "b"}))
        assert fleet.get("p") is state and (state.role, state.models, dict(state.labels)) == ("decode", frozenset({"m2"}), {"a": "b"})
        assert state.inflight_requests == 1 and fleet.models() is not models and "m2" in fleet.models()
        assert fleet.remove("p") is state and not state.healthy and fleet.get("p") is None and "m2" not in fleet.models()
        fleet.finished("p", 10, 20)  # a request that was in flight ends: nothing to count, no error
        assert await fleet.probe("p") is False and fleet.remove("p") is None


async def test_no_usable_kubernetes_configuration(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(disc.DiscoveryError, match="no usable Kubernetes configuration"):
        await make_api_client(dcfg(kubeconfig=str(tmp_path / "missing")))


# -- the list/watch protocol, driven by the real client -----------------------------------------


@pytest.fixture
def kube():
    with FakeKubeAPI() as api:
        yield api


async def until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Watching:
    """A Reflector over the fake API's pods (selector app=vllm), run by the real client."""

    def __init__(self, kube: FakeKubeAPI, tmp_path: Path, **cfg: Any) -> None:
        self.kube = kube
        self.cfg = dcfg(kubeconfig=str(kube.kubeconfig(tmp_path)), backoff_s=0.05, backoff_max_s=0.2, **cfg)
        self.changes = 0

    async def __aenter__(self) -> Reflector:
        from kubernetes_asyncio import client

        self.api, ns = await make_api_client(self.cfg)
        assert ns == "default"  # the kubeconfig context's namespace
        pods = client.CoreV1Api(self.api)
        self.reflector = Reflector("pods", _bind(pods.list_namespaced_pod, "default"), {"label_selector": "app=vllm"}, self._changed, self.cfg)
        self.task = asyncio.create_task(self.reflector.run())
        await asyncio.wait_for(self.reflector.synced.wait(), 10)
        await until(lambda: self.kube.open_watches("pods") == 1, what="the watch")
        return self.reflector

    def _changed(self) -> None:
        self.changes += 1

    async def __aexit__(self, *exc: object) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.api.close()


def vllm_pod(name: str, **kw: Any) -> dict[str, Any]:
    labels = {"app": "vllm", **kw.pop("labels", {})}
    return make_pod(name, labels=labels, **kw)


async def test_list_then_watch_from_its_version_with_bookmarks(kube, tmp_path):
    kube.apply("pods", vllm_pod("a"))
    kube.apply("pods", vllm_pod("b"))
    kube.apply("pods", make_pod("other", labels={"app": "web"}))
    listed_at = kube.rv
    async with Watching(kube, tmp_path) as r:
        assert sorted(r.items) == ["a", "b"]
        (watch,) = kube.watch_requests("pods")
        assert watch["resourceVersion"] == str(listed_at) and watch["allowWatchBookmarks"] in ("true", "True")
        assert watch["labelSelector"] == "app=vllm" and int(watch["timeoutSeconds"]) > 0
        # events move the set and the version
        kube.apply("pods", vllm_pod("c"))
        kube.delete("pods", "a")
        kube.patch("pods", "b", lambda o: o["metadata"]["labels"].update(app="web"))  # leaves the selection
        await until(lambda: sorted(r.items) == ["c"], what="events applied")
        assert r.resource_version == str(kube.rv)
        # changes the watch does not see, then a bookmark: the version moves on without an event
        for i in range(3):
            kube.apply("pods", make_pod(f"web-{i}", labels={"app": "web"}))
        at = kube.bookmark()
        await until(lambda: r.resource_version == str(at), what="the bookmark")
        assert r.stats.bookmarks == 1
        # the history is compacted at that version and the connection drops: the watch resumes
        # from the bookmark, no relist (without the bookmark it would have been 410 Gone)
        kube.expire()
        kube.drop_watches()
        await until(lambda: len(kube.watch_requests("pods")) == 2 and kube.open_watches("pods") == 1, what="the re-watch")
        assert kube.watch_requests("pods")[-1]["resourceVersion"] == str(at)
        kube.apply("pods", vllm_pod("d"))
        await until(lambda: sorted(r.items) == ["c", "d"], what="events after the re-watch")
        assert r.stats.lists == 1 and r.stats.expired == 0


@pytest.mark.parametrize("gone_mode", ["event", "http"])
async def test_410_gone_relists_and_applies_what_happened_while_away(kube, tmp_path, gone_mode):
    kube.gone_mode = gone_mode  # an ERROR event with a Status of code 410, or an HTTP 410
    for name in ("a", "b", "c"):
        kube.apply("pods", vllm_pod(name))
    async with Watching(kube, tmp_path) as r:
        kube.unavailable = True  # the API server goes away (and comes back with its history compacted)
        kube.drop_watches()
        await until(lambda: r.stats.errors >= 1, what="the dropped watch")
        kube.delete("pods", "a")
        kube.patch("pods", "b", lambda o: o["metadata"]["labels"].update(app="web"))
        kube.apply("pods", vllm_pod("d"))
        kube.expire()
        kube.unavailable = False
        await until(lambda: sorted(r.items) == ["c", "d"], what="the relist")
        assert r.stats.expired >= 1 and r.stats.lists == 2
        kube.apply("pods", vllm_pod("e"))  # and watching goes on from the new list
        await until(lambda: sorted(r.items) == ["c", "d", "e"], what="the next event")


async def test_connection_cut_mid_event_rewatches_without_loss_or_duplicates(kube, tmp_path):
    kube.apply("pods", vllm_pod("a"))
    kube.apply("pods", vllm_pod("b"))
    async with Watching(kube, tmp_path) as r:
        listed = r.resource_version
        kube.unavailable = True
        kube.drop_watches(partial=True)  # half an event line, then the connection is gone
        await until(lambda: r.stats.errors >= 1, what="the cut")
        kube.delete("pods", "a")
        kube.apply("pods", vllm_pod("c"))
        kube.patch("pods", "b", lambda o: o["metadata"]["labels"].update(extra="1"))
        await asyncio.sleep(0.3)  # a few refused retries (backoff)
        kube.unavailable = False
        await until(lambda: sorted(r.items) == ["b", "c"] and r.items["b"]["metadata"]["labels"].get("extra") == "1", what="the missed events")
        # resumed from the last version seen, not relisted; each missed change seen once
        assert r.stats.lists == 1 and r.stats.expired == 0
        assert r.stats.events == 3
        assert all(q["resourceVersion"] == listed for q in kube.watch_requests("pods")[1:])


async def test_paged_list(kube, tmp_path):
    for i in range(5):
        kube.apply("pods", vllm_pod(f"p{i}"))
    async with Watching(kube, tmp_path, page_size=2) as r:
        assert sorted(r.items) == [f"p{i}" for i in range(5)]
        lists = kube.list_requests("pods")
        assert [q.get("limit") for q in lists] == ["2", "2", "2"]
        assert "continue" not in lists[0] and all(q.get("continue") for q in lists[1:])


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp / "ca.crt", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=kubernetes"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


async def test_in_cluster_service_account(tmp_path, monkeypatch):
    """In a pod: KUBERNETES_SERVICE_HOST/PORT, the service account's token, CA and namespace."""
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    cert, key = _self_signed(sa)
    (sa / "token").write_text("in-cluster-token")
    (sa / "namespace").write_text("inference")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    with FakeKubeAPI(token="in-cluster-token", ssl_context=ctx) as kube:
        kube.apply("pods", make_pod("vllm-0", namespace="inference", labels={"llm-d.ai/inferenceServing": "true"}))
        kube.apply("pods", make_pod("vllm-1", namespace="default", labels={"llm-d.ai/inferenceServing": "true"}))
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(kube.port))
        monkeypatch.setattr(disc, "SERVICE_ACCOUNT_DIR", str(sa))
        from kubernetes_asyncio import client

        api, ns = await make_api_client(dcfg())
        try:
            assert ns == "inference"
            seen: list[str] = []
            r = Reflector("pods", _bind(client.CoreV1Api(api).list_namespaced_pod, ns), {"label_selector": disc.DEFAULT_POD_SELECTOR}, lambda: None, dcfg())
            task = asyncio.create_task(r.run())
            await asyncio.wait_for(r.synced.wait(), 10)
            seen = sorted(r.items)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        finally:
            await api.close()
        assert seen == ["vllm-0"]
        assert kube.requests[0][1] == "/api/v1/namespaces/inference/pods"


# -- a running gateway over simulated replicas -----------------------------------------------------


@pytest.fixture(scope="module")
def sims():
    f = SimFleet([SimConfig(model=MODEL, seed=i, time_scale=0.02, num_blocks=1024) for i in range(3)])
    f.start()
    yield f
    f.stop()


def _port(endpoint: str) -> str:
    return str(urlparse(endpoint).port)


def sim_pod(name: str, h, *, role: str = "both", labels: dict[str, str] | None = None, models: bool = False, **kw: Any) -> dict[str, Any]:
    """A pod standing for simulator ``h``: its ports in the kvgate.io annotations."""
    ann = {"kvgate.io/port": _port(h.url), "kvgate.io/kv-events-port": _port(h.events_endpoint), "kvgate.io/replay-port": _port(h.replay_endpoint)}
    if models:
        ann["kvgate.io/models"] = MODEL
    lb = {"llm-d.ai/inferenceServing": "true", "llm-d.ai/role": role, **(labels or {})}
    return make_pod(name, labels=lb, annotations=ann, **kw)


def gateway_config(kube: FakeKubeAPI, tmp_path: Path, **discovery: Any):
    d = {"kubeconfig": str(kube.kubeconfig(tmp_path)), "backoff_s": 0.05, "backoff_max_s": 0.2, "initial_sync_timeout_s": 5, **discovery}
    return fleet_config([], discovery=d, auth={"admin_key": "adm"})


def fleet_view(g: GatewayThread) -> dict[str, tuple[str, bool, str]]:
    async def read() -> dict[str, tuple[str, bool, str]]:
        return {s.id: (s.role, s.healthy, s.url) for s in g.gateway.fleet.all()}

    return g.call(read())


def ask(g: GatewayThread, prompt: str, **body: Any) -> httpx.Response:
    r = httpx.post(f"{g.url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2, **body}, timeout=30)
    assert r.status_code == 200, r.text
    return r


PROMPT = "You are a careful assistant for discovery tests. " + " ".join(f"fact {i} holds for item {i * 3};" for i in range(60))


def test_pods_appear_are_routed_indexed_then_leave(sims, kube, tmp_path):
    a, b, _ = sims.handles
    kube.apply("pods", sim_pod("vllm-a", a))  # models from the pod's own /v1/models
    kube.apply("pods", make_pod("web", labels={"app": "web"}))  # not selected
    with GatewayThread(gateway_config(kube, tmp_path)) as g:
        assert fleet_view(g) == {"vllm-a": ("both", True, a.url)}  # start waited for the first list
        kube.apply("pods", sim_pod("vllm-b", b, models=True))
        wait_for(lambda: set(fleet_view(g)) == {"vllm-a", "vllm-b"}, message="the new pod in the fleet")
        # routed, and the KV events of where it went reach the index (both pods subscribed)
        first = ask(g, PROMPT + " q0").headers["x-kvgate-replica"]
        wait_for(lambda: int(ask(g, PROMPT + f" q{time.monotonic()}").headers["x-kvgate-prefix-blocks"]) > 0, message="the pod's KV events in the index")
        assert ask(g, PROMPT + " q1").headers["x-kvgate-replica"] == first
        sub = g.gateway.subscriber
        wait_for(lambda: set(sub.sources) == {"vllm-a", "vllm-b"}, message="both pods subscribed")
        assert metric_value(get_metrics(g.url), "kvgate_kv_events_applied_total", {"replica": first}) > 0
        # the pod that holds the prefix is deleted while a stream from it is under way: the
        # stream finishes; no more routing there; its subscription and entries are dropped
        body = {"model": MODEL, "prompt": PROMPT + " streamed", "max_tokens": 40, "stream": True}
        with httpx.stream("POST", f"{g.url}/v1/completions", json=body, timeout=30) as stream:
            assert stream.headers["x-kvgate-replica"] == first
            chunks = stream.iter_text()
            head = next(chunks)
            kube.delete("pods", first)
            other = ({"vllm-a", "vllm-b"} - {first}).pop()
            wait_for(lambda: set(fleet_view(g)) == {other}, message="the pod gone from the fleet")
            rest = "".join(chunks)
        assert "data: [DONE]" in head + rest and (head + rest).count("data: {") > 1  # one read may already hold the whole stream on a busy machine
        wait_for(lambda: first not in sub.sources and first not in g.gateway.index._epochs, message="its subscription and index entries gone")
        for i in range(4):
            r = ask(g, PROMPT + f" after {i}")
            assert r.headers["x-kvgate-replica"] == other
        text = get_metrics(g.url)
        assert metric_value(text, "kvgate_discovery_changes_total", {"change": "removed"}) == 1
        assert metric_value(text, "kvgate_discovery_replicas", {"ready": "true"}) == 1
        assert metric_value(text, "kvgate_kv_events_applied_total", {"replica": first}) == 0  # its counters went too
        # the last pod leaves: 503, not a hang
        kube.delete("pods", other)
        wait_for(lambda: fleet_view(g) == {}, message="an empty fleet")
        r = httpx.post(f"{g.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}, timeout=10)
        assert r.status_code in (404, 503) and "error" in r.json()


def test_relabel_readiness_and_restart(sims, kube, tmp_path):
    a, b, c = sims.handles
    kube.apply("pods", sim_pod("vllm-a", a, models=True))
    kube.apply("pods", sim_pod("vllm-b", b, models=True))
    with GatewayThread(gateway_config(kube, tmp_path)) as g:
        wait_for(lambda: len(fleet_view(g)) == 2, message="two pods")
        # relabelled: P/D roles follow, and a request takes the two hops
        kube.patch("pods", "vllm-a", lambda o: o["metadata"]["labels"].update({"llm-d.ai/role": "prefill"}))
        kube.patch("pods", "vllm-b", lambda o: o["metadata"]["labels"].update({"llm-d.ai/role": "decode"}))
        wait_for(lambda: {k: v[0] for k, v in fleet_view(g).items()} == {"vllm-a": "prefill", "vllm-b": "decode"}, message="the new roles")
        r = ask(g, f"P/D {time.monotonic()} " + PROMPT * 2, max_tokens=3)
        assert r.headers["x-kvgate-replica"] == "vllm-a,vllm-b"  # prefill, then decode
        kube.patch("pods", "vllm-a", lambda o: o["metadata"]["labels"].update({"llm-d.ai/role": "both"}))
        kube.patch("pods", "vllm-b", lambda o: o["metadata"]["labels"].update({"llm-d.ai/role": "both"}))
        wait_for(lambda: {v[0] for v in fleet_view(g).values()} == {"both"}, message="roles back")
        # not ready: kept (its index too) but not routed; ready again: routed again
        sub = g.gateway.subscriber
        kube.patch("pods", "vllm-a", lambda o: o["status"]["conditions"][-1].update(status="False"))
        wait_for(lambda: fleet_view(g)["vllm-a"][1] is False, message="vllm-a not ready")
        assert "vllm-a" in sub.sources
        for i in range(4):
            assert ask(g, f"ready test {i} " + PROMPT).headers["x-kvgate-replica"] == "vllm-b"
        kube.patch("pods", "vllm-a", lambda o: o["status"]["conditions"][-1].update(status="True"))
        wait_for(lambda: fleet_view(g)["vllm-a"][1] is True, message="vllm-a ready again")
        # being deleted (graceful termination): not ready at once
        kube.patch("pods", "vllm-a", lambda o: o["metadata"].update(deletionTimestamp="2026-01-01T00:00:30Z"))
        wait_for(lambda: fleet_view(g)["vllm-a"][1] is False, message="terminating = not ready")
        # restarted as a new pod under the same name (new uid, new address: simulator c):
        # a new replica behind the same id, its old circuit, subscription and entries gone
        kube.delete("pods", "vllm-a")
        kube.apply("pods", sim_pod("vllm-a", c, models=True))
        wait_for(lambda: fleet_view(g).get("vllm-a") == ("both", True, c.url), message="vllm-a at its new address")
        wait_for(lambda: sub.sources.get("vllm-a") is not None and sub.sources["vllm-a"].endpoint == c.events_endpoint, message="subscribed at the new address")
        # a pod recreated with the same address but a new uid, whose circuit had opened
        kube.apply(
            "pods", sim_pod("vllm-b", b, models=True) | {"metadata": {**sim_pod("vllm-b", b, models=True)["metadata"], "annotations": {"kvgate.io/port": "1"}}}
        )
        wait_for(lambda: fleet_view(g)["vllm-b"][2].endswith(":1"), message="vllm-b pointed at a dead port")
        wait_for(lambda: fleet_view(g)["vllm-b"][1] is False, timeout=15, message="vllm-b's circuit open")
        kube.delete("pods", "vllm-b")
        kube.apply("pods", sim_pod("vllm-b", b, models=True))
        wait_for(lambda: fleet_view(g).get("vllm-b") == ("both", True, b.url), message="a fresh circuit")
        text = get_metrics(g.url)
        assert metric_value(text, "kvgate_discovery_changes_total", {"change": "updated"}) >= 4


def test_container_restart_resets_the_circuit(sims, kube, tmp_path):
    """Same pod (uid, IP), its container restarted (restartCount up): the circuit starts over."""
    kube.apply("pods", make_pod("vllm-x", labels={"llm-d.ai/inferenceServing": "true"}, annotations={"kvgate.io/port": "1", "kvgate.io/models": MODEL}))
    cfg = gateway_config(kube, tmp_path, kv_events_port=None)
    cfg.health.interval_s, cfg.health.failure_threshold = 60.0, 1  # only the probe at discovery
    with GatewayThread(cfg) as g:
        wait_for(lambda: fleet_view(g)["vllm-x"][1] is False, message="its circuit open (nothing listens on port 1)")
        kube.patch("pods", "vllm-x", lambda o: o["status"]["containerStatuses"][0].update(restartCount=1))
        wait_for(lambda: fleet_view(g)["vllm-x"][1] is True, message="the circuit reset")
        assert metric_value(get_metrics(g.url), "kvgate_discovery_changes_total", {"change": "replaced"}) == 0


def test_inference_pool_selector_and_port(sims, kube, tmp_path):
    a, b, c = sims.handles
    # pods without a port annotation take the pool's target port: simulator a's
    kube.apply("pods", sim_pod("pa", a, labels={"pool": "one"}) | {"metadata": {**sim_pod("pa", a)["metadata"], "labels": {"pool": "one"}, "annotations": {}}})
    kube.apply("pods", sim_pod("pb", b, labels={"pool": "two"}))
    kube.apply("pods", sim_pod("pc", c, labels={"pool": "two"}))
    kube.apply("inferencepools", make_pool("vllm-pool", {"pool": "one"}, int(_port(a.url))))
    with GatewayThread(gateway_config(kube, tmp_path, kind="inferencepool", inference_pool="vllm-pool", kv_events_port=None)) as g:
        assert fleet_view(g) == {"pa": ("both", True, a.url)}
        assert kube.list_requests("inferencepools")[0]["fieldSelector"] == "metadata.name=vllm-pool"
        assert kube.list_requests("pods")[0]["labelSelector"] == "pool=one"
        assert ask(g, "pool " + PROMPT).headers["x-kvgate-replica"] == "pa"
        # the pool selects other pods: the set follows
        kube.patch("inferencepools", "vllm-pool", lambda o: o["spec"]["selector"].update(matchLabels={"pool": "two"}))
        wait_for(lambda: set(fleet_view(g)) == {"pb", "pc"}, message="the pool's new pods")
        assert kube.list_requests("pods")[-1]["labelSelector"] == "pool=two"
        assert {ask(g, f"pool {i} " + PROMPT).headers["x-kvgate-replica"] for i in range(4)} <= {"pb", "pc"}
        # the pool is deleted: no pods
        kube.delete("inferencepools", "vllm-pool")
        wait_for(lambda: fleet_view(g) == {}, message="no pool, no pods")


def test_inference_pool_v1alpha2(sims, kube, tmp_path):
    a, _, _ = sims.handles
    kube.apply("pods", sim_pod("pa", a, labels={"pool": "one"}))
    kube.apply("inferencepools", make_pool("old-pool", {"pool": "one"}, 8000, api="v1alpha2"))
    cfg = gateway_config(kube, tmp_path, kind="inferencepool", inference_pool="old-pool", inference_pool_api="inference.networking.x-k8s.io/v1alpha2")
    with GatewayThread(cfg) as g:
        assert fleet_view(g) == {"pa": ("both", True, a.url)}
        assert kube.requests[0][1] == "/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/default/inferencepools"


def test_unreachable_api_server_does_not_stop_the_gateway(sims, tmp_path):
    """No API server at start: the gateway serves (its static replicas) and keeps trying."""
    a = sims.handles[0]
    kube = FakeKubeAPI()
    kube.sock.close()  # never started: its address refuses connections
    kc = kube.kubeconfig(tmp_path)
    cfg = fleet_config([a], discovery={"kubeconfig": str(kc), "backoff_s": 0.05, "backoff_max_s": 0.2, "initial_sync_timeout_s": 0.5})
    with GatewayThread(cfg) as g:
        assert set(fleet_view(g)) == {"r0"}
        assert ask(g, "static " + PROMPT).headers["x-kvgate-replica"] == "r0"
        wait_for(lambda: metric_value(get_metrics(g.url), "kvgate_discovery_errors_total") >= 2, message="retries")


def test_extproc_picks_the_pools_pods(sims, kube, tmp_path):
    """``kvgate extproc`` as the InferencePool's endpoint picker: it answers with the pool's pods."""
    pytest.importorskip("envoy.service.ext_proc.v3.external_processor_pb2")
    from tests.helpers.envoy import ExtProcThread
    from tests.helpers.extproc import Conversation, body_msg, headers_msg, prompt_bytes

    a, b, _ = sims.handles
    kube.apply("pods", sim_pod("pa", a, labels={"pool": "one"}))
    kube.apply("pods", sim_pod("pb", b, labels={"pool": "two"}))
    kube.apply("inferencepools", make_pool("vllm-pool", {"pool": "one"}, 8000))
    ep = ExtProcThread(gateway_config(kube, tmp_path, kind="inferencepool", inference_pool="vllm-pool")).start()
    try:

        async def pick(text: str) -> str:
            async with Conversation(ep.port) as c:
                await c.send(headers_msg(), 1)
                [resp] = await c.send(body_msg(prompt_bytes(text), eos=True), 1)
                mutation = resp.request_body.response.header_mutation
                return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}["x-gateway-destination-endpoint"]

        assert asyncio.run(pick("extproc one " + PROMPT)) == f"127.0.0.1:{_port(a.url)}"
        kube.patch("inferencepools", "vllm-pool", lambda o: o["spec"]["selector"].update(matchLabels={"pool": "two"}))
        wait_for(lambda: [s.id for s in ep.call(ep.server.gateway.fleet.all)] == ["pb"], message="the picker's fleet follows the pool")
        assert asyncio.run(pick("extproc two " + PROMPT)) == f"127.0.0.1:{_port(b.url)}"
    finally:
        ep.stop()


# -- data-parallel pods: one replica per rank ----------------------------------------------------


def test_a_data_parallel_pod_expands_into_its_ranks():
    ann = {"kvgate.io/data-parallel-size": "3", "kvgate.io/replay-port": "6000"}
    p = pod_replica(make_pod("srv", ip="10.0.0.7", annotations=ann), dcfg())
    assert p is not None and p.data_parallel_size == 3
    got = [(r.id, r.url, r.kv_events, r.replay, r.data_parallel_rank) for r in disc.expand_pod(p)]
    assert got == [
        ("srv-dp0", "http://10.0.0.7:8000", "tcp://10.0.0.7:5557", "tcp://10.0.0.7:6000", 0),
        ("srv-dp1", "http://10.0.0.7:8000", "tcp://10.0.0.7:5558", "tcp://10.0.0.7:6001", 1),
        ("srv-dp2", "http://10.0.0.7:8000", "tcp://10.0.0.7:5559", "tcp://10.0.0.7:6002", 2),
    ]
    one = pod_replica(make_pod("one", annotations={"kvgate.io/data-parallel-size": "1"}), dcfg())
    assert one is not None and disc.expand_pod(one) == [one] and one.data_parallel_rank is None
    quiet = pod_replica(make_pod("quiet", annotations={**ann, "kvgate.io/kv-events-port": "none"}), dcfg())
    assert quiet is not None and [(r.kv_events, r.replay) for r in disc.expand_pod(quiet)] == [(None, None)] * 3
    for bad in ("0", "two", "-1", "5000"):
        with pytest.raises(PodSkipped, match="data-parallel-size"):
            pod_replica(make_pod("srv", annotations={"kvgate.io/data-parallel-size": bad}), dcfg())
    with pytest.raises(PodSkipped, match="65535"):  # rank 1's events would be on port 65536
        pod_replica(make_pod("srv", annotations={"kvgate.io/data-parallel-size": "2", "kvgate.io/kv-events-port": "65535"}), dcfg())


def _consecutive_free_ports(n: int) -> int:
    """The first of ``n`` consecutive loopback ports free right now (vLLM's rank offsets)."""
    import socket

    for _ in range(50):
        base = free_port()
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


def test_data_parallel_pod_is_routed_and_indexed_per_rank(kube, tmp_path):
    """A pod annotated kvgate.io/data-parallel-size: "2" in front of a vLLM-like DP server (two
    engines, each publishing on the pod's ports plus its rank): two replicas <pod>-dp0/-dp1, each
    subscribed at its rank's ports, requests carrying the rank header of the replica picked."""
    from tests.helpers.dp import DPFront

    events, replay = _consecutive_free_ports(2), _consecutive_free_ports(2)
    fleet = SimFleet([SimConfig(model=MODEL, seed=60 + i, time_scale=0.0, kv_events_port=events + i, replay_port=replay + i) for i in range(2)])
    fleet.start()
    try:
        with DPFront([h.url for h in fleet.handles]) as front:
            ann = {
                "kvgate.io/port": str(front.port),
                "kvgate.io/kv-events-port": str(events),
                "kvgate.io/replay-port": str(replay),
                "kvgate.io/models": MODEL,
                "kvgate.io/data-parallel-size": "2",
            }
            kube.apply("pods", make_pod("srv", labels={"llm-d.ai/inferenceServing": "true"}, annotations=ann))
            with GatewayThread(gateway_config(kube, tmp_path)) as g:
                assert fleet_view(g) == {"srv-dp0": ("both", True, front.url), "srv-dp1": ("both", True, front.url)}
                sub = g.gateway.subscriber
                wait_for(lambda: len(sub.sources) == 2, message="both ranks subscribed")
                assert {rid: (s.endpoint, s.replay_endpoint) for rid, s in sub.sources.items()} == {
                    f"srv-dp{rank}": (f"tcp://127.0.0.1:{events + rank}", f"tcp://127.0.0.1:{replay + rank}") for rank in range(2)
                }
                assert [g.gateway.fleet.dp_rank(f"srv-dp{rank}") for rank in range(2)] == [0, 1]
                landed = ask(g, PROMPT + " dp").headers["x-kvgate-replica"]
                assert front.ranks_seen[-1] == landed.removeprefix("srv-dp")  # the rank header of the replica picked
                other = ({"srv-dp0", "srv-dp1"} - {landed}).pop()
                wait_for(lambda: sub.stats.replica(landed).batches_applied > 0, message="its rank's events indexed")
                assert sub.stats.replica(other).batches_applied == 0  # the other rank's socket said nothing
                wait_for(lambda: int(ask(g, PROMPT + f" dp {time.monotonic()}").headers["x-kvgate-prefix-blocks"]) > 0, message="prefix hits")
                r = ask(g, PROMPT + " dp again")
                assert r.headers["x-kvgate-replica"] == landed and front.ranks_seen[-1] == landed.removeprefix("srv-dp")
                # resized to one rank: the per-rank replicas leave, the whole server is one replica
                kube.patch("pods", "srv", lambda o: o["metadata"]["annotations"].update({"kvgate.io/data-parallel-size": "1"}))
                wait_for(lambda: set(fleet_view(g)) == {"srv"}, message="one replica")
                assert g.gateway.fleet.dp_rank("srv") is None
    finally:
        fleet.stop()
