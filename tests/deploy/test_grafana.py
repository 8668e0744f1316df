"""deploy/grafana/kvgate.json against a running gateway's and a running indexer's /metrics.

A real gateway (GatewayThread) in front of a simulated prefill and decode replica, found through
Kubernetes discovery (the loopback API server of tests/helpers/kube_api.py), so that every family
the gateway can export is on its /metrics: request, latency, P/D, index, replica, admission and
discovery metrics; beside it a ``kvgate indexer`` (in process) following the same pods into a
real redis-server, for the families only an indexer exports. Every metric the dashboard's PromQL
names must be a series of those scrapes (a counter as ``_total``, a histogram as
``_bucket``/``_sum``/``_count``, a gauge as is), and every ``kvgate_*`` family of either scrape
must be on some panel.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import parse_config
from gateway.indexer import Indexer
from simulator.config import SimConfig
from simulator.fleet import SimFleet
from tests.helpers.gateway import MODEL, GatewayThread, fleet_config, get_metrics, metric_value, wait_for
from tests.helpers.kube_api import FakeKubeAPI, make_pod

pytest.importorskip("kubernetes_asyncio")

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "kvgate.json"
METRIC = re.compile(r"\bkvgate_[a-z0-9_]+\b")
#: the series names each family type has in the text exposition
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "summary": ("_sum", "_count", "")}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(d: dict[str, Any]):
    for p in d["panels"]:
        yield p
        yield from p.get("panels", [])


def queries(d: dict[str, Any]) -> list[str]:
    """Every PromQL text of the dashboard: panel targets and template variable queries."""
    out = [t["expr"] for p in panels(d) for t in p.get("targets", [])]
    for v in d["templating"]["list"]:
        q = v.get("query")
        if isinstance(q, dict):
            out.append(q["query"])
        elif v["type"] == "query":
            out.append(q)
    return out


def sim_pod(name: str, handle, role: str) -> dict[str, Any]:
    """A serving pod as the API server shows it, standing for a simulator on loopback ports."""
    ann = {
        "kvgate.io/port": str(urlparse(handle.url).port),
        "kvgate.io/kv-events-port": str(urlparse(handle.events_endpoint).port),
        "kvgate.io/replay-port": str(urlparse(handle.replay_endpoint).port),
        "kvgate.io/models": MODEL,
    }
    return make_pod(name, labels={"llm-d.ai/inferenceServing": "true", "llm-d.ai/role": role}, annotations=ann)


class IndexerThread:
    """``kvgate indexer``'s runner (gateway.indexer.Indexer) on its own event loop in a thread,
    its /metrics on a port the kernel picks."""

    def __init__(self, cfg) -> None:
        self.indexer = Indexer(cfg, metrics_host="127.0.0.1", metrics_port=0, loss_check_s=0.5)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> IndexerThread:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.indexer.start(), self.loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.indexer.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.indexer.metrics_port}"


@pytest.fixture(scope="module")
def scrape(tmp_path_factory, redis_server) -> dict[str, str]:
    """/metrics of a gateway that has discovered a prefill and a decode pod and served one- and
    two-hop requests, a refused one and an unknown model; and of an indexer on the same pods."""
    fleet = SimFleet(
        [SimConfig(model=MODEL, seed=1, time_scale=0.02, num_blocks=1024, role=role) for role in ("prefill", "decode")],
    )
    handles = fleet.start()
    kube = FakeKubeAPI().start()
    try:
        for role, h in zip(("prefill", "decode"), handles):
            kube.apply("pods", sim_pod(f"vllm-{role}", h, role))
        kc = kube.kubeconfig(tmp_path_factory.mktemp("kube"))
        discovery = {"kubeconfig": str(kc), "backoff_s": 0.05, "backoff_max_s": 0.2, "initial_sync_timeout_s": 5}
        cfg = fleet_config([], discovery=discovery, pd={"enabled": True, "threshold": 32})
        redis_db = redis_server.url.rsplit("/", 1)[0] + "/7"  # a database of its own on the session's server
        indexer_cfg = parse_config({"discovery": discovery, "index": {"backend": redis_db}, "health": {"interval_s": 0.3}})
        with GatewayThread(cfg) as g, IndexerThread(indexer_cfg) as ix:
            wait_for(lambda: len(g.gateway.fleet.all()) == 2 and all(s.healthy for s in g.gateway.fleet.all()), message="both pods in the fleet")
            long_prompt = "Summarise the following notes carefully. " + " ".join(f"note {i} says item {i * 7} is fine;" for i in range(80))
            for i in range(3):
                r = httpx.post(f"{g.url}/v1/completions", json={"model": MODEL, "prompt": f"{long_prompt} q{i}", "max_tokens": 3}, timeout=30)
                assert r.status_code == 200, r.text
            r = httpx.post(f"{g.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": True}, timeout=30)
            assert r.status_code == 200
            assert httpx.post(f"{g.url}/v1/completions", json={"model": "no-such-model", "prompt": "x"}, timeout=10).status_code == 404
            wait_for(lambda: metric_value(get_metrics(g.url), "kvgate_kv_events_applied_total") > 0, message="KV events in the index")
            wait_for(lambda: metric_value(get_metrics(ix.url), "kvgate_kv_events_applied_total") > 0, message="KV events in Redis")
            text = {"gateway": get_metrics(g.url), "indexer": get_metrics(ix.url)}
        assert metric_value(text["gateway"], "kvgate_pd_requests_total", {"path": "two_hop"}) >= 1, "the long prompts went through prefill → decode"
        for t in text.values():
            assert metric_value(t, "kvgate_discovery_replicas", {"ready": "true"}) == 2
        assert metric_value(text["indexer"], "kvgate_kv_subscriptions") == 2
        return text
    finally:
        kube.stop()
        fleet.stop()


def families(text: str) -> dict[str, tuple[str, set[str]]]:
    """kvgate_* family name -> (type, the series names the exposition may carry for it)."""
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith("kvgate_"):
            out[fam.name] = (fam.type, {fam.name + s for s in SUFFIXES[fam.type]})
    # prometheus_client's creation timestamps of counters and histograms (`<name>_created`), which
    # the parser reads as gauges of their own: not families to chart
    return {name: v for name, v in out.items() if not (name.endswith("_created") and name.removesuffix("_created") in out)}


def test_every_dashboard_metric_is_served_and_every_family_is_shown(scrape):
    fams = families(scrape["gateway"])
    assert len(fams) >= 40, sorted(fams)
    for name, fam in families(scrape["indexer"]).items():
        assert fams.setdefault(name, fam)[0] == fam[0], f"{name} has another type at the indexer"
    series = {name: fam for fam, (_, names) in fams.items() for name in names}
    used = {m for q in queries(dashboard()) for m in METRIC.findall(q)}
    unknown = sorted(used - set(series))
    assert not unknown, f"the dashboard queries series neither the gateway nor the indexer exports: {unknown}"
    shown = {series[m] for m in used}
    missing = sorted(set(fams) - shown)
    assert not missing, f"exported families on no panel: {missing}"


def test_dashboard_queries_are_well_formed():
    """Grafana model basics, and PromQL shapes that fail silently when wrong: quantiles over
    buckets grouped by le, rates over counters only, brackets balanced."""
    d = dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in d["templating"]["list"]} >= {"datasource", "instance"}
    for p in panels(d):
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}" and p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs))
        for t in p["targets"]:
            e = t["expr"]
            for o, c in ("()", "[]", "{}"):
                assert e.count(o) == e.count(c), e
            for q in re.finditer(r"histogram_quantile\(([^,]+),(.*)$", e):
                assert 0 < float(q.group(1)) < 1 and "_bucket" in q.group(2) and re.search(r"by \((le|le, [a-z_, ]+)\)", q.group(2)), e
            for m in re.finditer(r"(rate|increase)\((kvgate_[a-z0-9_]+)", e):
                assert m.group(2).endswith(("_total", "_bucket", "_sum", "_count")), f"{m.group(1)} over a gauge: {e}"
            assert "$instance" in e, f"the gateway filter is missing: {e}"
    # every panel sits on the 24-column grid
    for p in panels(d):
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["h"] > 0
