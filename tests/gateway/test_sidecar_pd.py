"""Prefill→decode through Envoy: the picker names the prefill endpoint, the decode pod's sidecar
runs both hops (llm-d's architecture), the simulated replicas move the KV over NIXL.

The sidecar alone first (what it does with and without ``x-prefiller-host-port``), then the
whole path: openai SDK → Envoy (both ext_proc modes) → ``kvgate extproc`` → the decode pod's
``kvgate sidecar`` → prefill replica (hop 1) → the pod's own vLLM (hop 2).
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from gateway.config import GatewayConfig, parse_config
from gateway.server import uvicorn_config
from gateway.sidecar import PREFILL_HEADER, build_sidecar_app, sidecar_config
from simulator.fleet import SimConfig, SimFleet
from tests.helpers.envoy import ExtProcThread, envoy_binary, extproc_envoy
from tests.helpers.gateway import MODEL, fleet_config, metric_value, replica_metric, wait_for
from tests.helpers.kube_api import FakeKubeAPI, make_pod
from tests.helpers.net import bound_socket

MODES = ["buffered", "full-duplex"]


def doc(tag: str) -> str:
    return f"Contract {tag}: " + " ".join(f"article {i} binds party {tag} to deliver lot {i * 5} on time;" for i in range(80))


class SidecarThread:
    """``kvgate sidecar`` (the same app and uvicorn setup) on its own loop in a daemon thread."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.app = build_sidecar_app(cfg)
        self.sock = bound_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(self.app, "127.0.0.1", self.port, loop="none", limits=cfg.limits))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def sidecar(self):
        return self.app.state.sidecar

    def __enter__(self) -> SidecarThread:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("sidecar did not start")
            time.sleep(0.02)
        wait_for(lambda: httpx.get(f"{self.url}/health", timeout=2).status_code == 200, message="local vLLM through the sidecar")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def _addr(handle) -> str:
    return f"127.0.0.1:{handle.config.port}"


def _prompts(url: str) -> float:
    return replica_metric(url, "vllm:prompt_tokens_total")


@pytest.fixture(scope="module")
def pd():
    """Two prefill replicas (the second never allowed to the sidecar) and the decode pod's vLLM."""
    fleet = SimFleet(
        [SimConfig(model=MODEL, role=r, seed=i, time_scale=0.02, num_blocks=1024) for i, r in enumerate(["prefill", "prefill", "decode"])], mode="process"
    )
    fleet.start()
    yield fleet
    fleet.stop()


@pytest.fixture(scope="module")
def sidecar(pd):
    cfg = sidecar_config(pd.handles[2].url, [_addr(pd.handles[0])])
    with SidecarThread(cfg) as s:
        yield s


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)


def test_without_the_header_the_local_vllm_serves_alone(pd, sidecar):
    pre = _prompts(pd.handles[0].url)
    r = _client(sidecar.url).completions.create(model=MODEL, prompt=doc("local"), max_tokens=4)
    assert r.usage.completion_tokens == 4 and r.usage.prompt_tokens_details.cached_tokens == 0
    assert _prompts(pd.handles[0].url) == pre  # no prefill hop


@pytest.mark.parametrize("stream", [False, True])
def test_with_the_header_hop_1_runs_on_the_named_prefill_and_hop_2_pulls_the_kv(pd, sidecar, stream):
    c = _client(sidecar.url).with_options(default_headers={PREFILL_HEADER: _addr(pd.handles[0])})
    pre = _prompts(pd.handles[0].url)
    if stream:
        chunks = list(c.completions.create(model=MODEL, prompt=doc(f"two-{stream}"), max_tokens=6, stream=True, stream_options={"include_usage": True}))
        usage = chunks[-1].usage
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices)
    else:
        usage = c.completions.create(model=MODEL, prompt=doc(f"two-{stream}"), max_tokens=6).usage
    assert usage.completion_tokens == 6
    assert _prompts(pd.handles[0].url) > pre  # hop 1 computed the prompt
    # hop 2 did not: the decode replica reports the prompt as cached (pulled, not computed)
    assert usage.prompt_tokens_details.cached_tokens >= usage.prompt_tokens - 16


def test_responses_take_both_hops_through_the_sidecar(pd, sidecar):
    """``responses.create`` with the header: hop 1 on the named prefill, hop 2 pulls the KV."""
    c = _client(sidecar.url).with_options(default_headers={PREFILL_HEADER: _addr(pd.handles[0])})
    pre = _prompts(pd.handles[0].url)
    r = c.responses.create(model=MODEL, instructions=doc("responses"), input="summarise", max_output_tokens=6)
    assert r.usage.output_tokens == 6
    assert _prompts(pd.handles[0].url) > pre
    assert r.usage.input_tokens_details.cached_tokens >= r.usage.input_tokens - 16


def test_a_prefill_target_not_allowed_is_refused_and_never_called(pd, sidecar):
    other = pd.handles[1].url
    before = _prompts(other)
    for target in (_addr(pd.handles[1]), "169.254.169.254:80", "evil.example:443"):
        r = httpx.post(
            f"{sidecar.url}/v1/completions", json={"model": MODEL, "prompt": doc("evil"), "max_tokens": 2}, headers={PREFILL_HEADER: target}, timeout=30
        )
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "prefill_target_refused"
    assert _prompts(other) == before


def test_client_kv_transfer_params_are_stripped(pd, sidecar):
    r = httpx.post(
        f"{sidecar.url}/v1/completions",
        json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "kv_transfer_params": {"do_remote_decode": True}},
        timeout=30,
    )
    assert r.status_code == 200 and r.json().get("kv_transfer_params") is None  # no KV reserved for the client


def test_other_paths_pass_through_to_the_local_vllm(sidecar):
    assert httpx.get(f"{sidecar.url}/v1/models", timeout=5).json()["data"][0]["id"] == MODEL
    assert "vllm:num_requests_running" in httpx.get(f"{sidecar.url}/metrics", timeout=5).text


# -- the whole path through Envoy ---------------------------------------------------------------


@pytest.fixture(scope="module")
def envoy_pd(tmp_path_factory):
    """Envoy ×2 (both modes) → picker → decode pod (sidecar + vLLM); one prefill replica."""
    envoy_binary()
    fleet = SimFleet(
        [SimConfig(model=MODEL, role=r, seed=10 + i, time_scale=0.02, num_blocks=1024) for i, r in enumerate(["prefill", "decode"])], mode="process"
    )
    fleet.start()
    prefill, decode = fleet.handles
    side = SidecarThread(sidecar_config(decode.url, [_addr(prefill)])).__enter__()
    # the picker sees the decode pod at the sidecar's address, and the pod vLLM's KV events
    cfg = fleet_config(fleet.handles, pd={"threshold": 128})
    cfg.replicas[1].url = side.url
    ep = ExtProcThread(cfg).start()
    envoys = {}
    try:
        for mode in MODES:
            envoys[mode] = extproc_envoy(tmp_path_factory.mktemp(f"pd-{mode}"), ep.port, mode).start()
        wait_for(lambda: all(s.healthy for s in ep.call(ep.server.gateway.fleet.all)), message="replicas healthy")
        yield fleet, side, ep, envoys
    finally:
        for e in envoys.values():
            e.stop()
        ep.stop()
        side.__exit__()
        fleet.stop()


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


def test_long_prompt_two_hops_then_cached_follow_up_one_hop(envoy_pd, mode):
    fleet, side, ep, envoys = envoy_pd
    prefill, decode = fleet.handles
    c = _client(envoys[mode].url)
    text = doc(f"envoy-{mode}")
    pre = _prompts(prefill.url)
    chunks = list(c.completions.create(model=MODEL, prompt=text, max_tokens=5, stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage.completion_tokens == 5 and usage.prompt_tokens_details.cached_tokens >= usage.prompt_tokens - 16
    assert _prompts(prefill.url) > pre  # hop 1 on the prefill replica
    two = metric_value(side.sidecar.gw.metrics.render().decode(), "kvgate_pd_requests_total", {"path": "two_hop"})
    assert two >= 1

    # the same prompt again: the decode pod holds it now (its KV events told the picker): one hop
    def one_hop() -> bool:
        before = _prompts(prefill.url)
        c.completions.create(model=MODEL, prompt=text + " and more", max_tokens=2)
        return _prompts(prefill.url) == before

    wait_for(one_hop, timeout=10, message="cached follow-up skips the prefill hop")


def test_prefill_killed_mid_run_costs_no_request(tmp_path_factory):
    envoy_binary()
    fleet = SimFleet(
        [SimConfig(model=MODEL, role=r, seed=20 + i, time_scale=0.02, num_blocks=1024) for i, r in enumerate(["prefill", "decode"])], mode="process"
    )
    fleet.start()
    prefill, decode = fleet.handles
    try:
        with SidecarThread(sidecar_config(decode.url, [_addr(prefill)])) as side:
            cfg = fleet_config(fleet.handles, pd={"threshold": 128}, health={"interval_s": 30})
            cfg.replicas[1].url = side.url
            ep = ExtProcThread(cfg).start()
            envoy = extproc_envoy(tmp_path_factory.mktemp("pd-kill"), ep.port, "buffered").start()
            try:
                wait_for(lambda: all(s.healthy for s in ep.call(ep.server.gateway.fleet.all)), message="replicas healthy")
                c = _client(envoy.url)
                ok = 0
                for i in range(8):
                    if i == 3:
                        fleet.kill(0)  # the prefill replica dies; the picker still names it until its circuit opens
                    r = c.completions.create(model=MODEL, prompt=doc(f"kill-{i}"), max_tokens=3)
                    ok += r.usage.completion_tokens == 3
                assert ok == 8
                assert metric_value(side.sidecar.gw.metrics.render().decode(), "kvgate_pd_fallbacks_total", {"reason": "prefill_failed"}) >= 1
            finally:
                envoy.stop()
                ep.stop()
    finally:
        fleet.stop()


def test_a_client_cannot_pick_the_prefill_endpoint_through_envoy(envoy_pd, mode):
    """A short prompt is one hop: the picker removes a client's own x-prefiller-host-port."""
    fleet, side, ep, envoys = envoy_pd
    prefill = fleet.handles[0]
    before = _prompts(prefill.url)
    r = httpx.post(
        f"{envoys[mode].url}/v1/completions",
        json={"model": MODEL, "prompt": "short and sweet", "max_tokens": 2},
        headers={PREFILL_HEADER: _addr(prefill)},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert _prompts(prefill.url) == before


# -- prefill targets from Kubernetes discovery, followed live ----------------------------------------


def _pod(name: str, handle, role: str) -> dict:
    """A serving pod on loopback: its simulator's HTTP port in kvgate.io/port, as the picker's
    discovery would name it in the header."""
    ann = {"kvgate.io/port": str(handle.config.port), "kvgate.io/models": MODEL, "kvgate.io/kv-events-port": "none"}
    return make_pod(name, labels={"llm-d.ai/inferenceServing": "true", "llm-d.ai/role": role}, annotations=ann)


def _two_hop(url: str, target: str, tag: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": doc(tag), "max_tokens": 2}, headers={PREFILL_HEADER: target}, timeout=30)


def test_discovered_prefill_pods_are_allowed_as_they_come_and_refused_once_gone(pd, tmp_path):
    pytest.importorskip("kubernetes_asyncio")
    pre0, pre1, dec = pd.handles
    with FakeKubeAPI() as kube:
        kube.apply("pods", _pod("vllm-decode-0", dec, "decode"))
        kube.apply("pods", _pod("vllm-prefill-0", pre0, "prefill"))
        base = parse_config({"discovery": {"kubeconfig": str(kube.kubeconfig(tmp_path)), "backoff_s": 0.05, "backoff_max_s": 0.2, "initial_sync_timeout_s": 5}})
        with SidecarThread(sidecar_config(dec.url, [], base)) as s:
            targets = s.sidecar.targets
            assert set(targets.by_addr) == {_addr(pre0)}  # decode pods are never targets
            before = _prompts(pre0.url)
            r = _two_hop(s.url, _addr(pre0), "disc-0")
            assert r.status_code == 200, r.text
            assert _prompts(pre0.url) > before  # hop 1 ran on the discovered prefill pod
            # a prefill pod created after the sidecar started: refused until its watch event,
            # then allowed, without a restart
            r = _two_hop(s.url, _addr(pre1), "disc-early")
            assert r.status_code == 403 and r.json()["error"]["code"] == "prefill_target_refused"
            kube.apply("pods", _pod("vllm-prefill-1", pre1, "prefill"))
            added = time.monotonic()
            wait_for(lambda: targets.lookup(_addr(pre1)) is not None, timeout=5, message="the new prefill pod allowed")
            assert time.monotonic() - added < 3
            before = _prompts(pre1.url)
            assert _two_hop(s.url, _addr(pre1), "disc-1").status_code == 200
            assert _prompts(pre1.url) > before
            # the decode pod's own address is discovered too, but not a prefill target
            assert _two_hop(s.url, _addr(dec), "disc-dec").status_code == 403
            # deleted: refused again, and never called
            kube.delete("pods", "vllm-prefill-1")
            wait_for(lambda: targets.lookup(_addr(pre1)) is None, timeout=5, message="the deleted pod refused")
            before = _prompts(pre1.url)
            r = _two_hop(s.url, _addr(pre1), "disc-gone")
            assert r.status_code == 403 and r.json()["error"]["code"] == "prefill_target_refused"
            # relabelled to decode: no longer a target; to both: a target again
            kube.patch("pods", "vllm-prefill-0", lambda o: o["metadata"]["labels"].update({"llm-d.ai/role": "decode"}))
            wait_for(lambda: targets.lookup(_addr(pre0)) is None, timeout=5, message="a decode pod refused")
            kube.patch("pods", "vllm-prefill-0", lambda o: o["metadata"]["labels"].update({"llm-d.ai/role": "both"}))
            wait_for(lambda: targets.lookup(_addr(pre0)) is not None, timeout=5, message="a both pod allowed")
            assert _two_hop(s.url, _addr(pre0), "disc-both").status_code == 200
            assert _prompts(pre1.url) == before
            text = httpx.get(f"{s.url}/sidecar/metrics", timeout=5).text
            assert metric_value(text, "kvgate_discovery_replicas", {"ready": "true"}) == 1  # prefill/both pods only
            assert metric_value(text, "kvgate_discovery_changes_total", {"change": "removed"}) >= 2


def test_static_prefill_targets_stay_beside_discovered_ones(pd, tmp_path):
    """``--prefill`` and the config's discovery together: both sets are allowed; the API server
    down at start leaves the static ones working."""
    pytest.importorskip("kubernetes_asyncio")
    pre0, pre1, dec = pd.handles
    kube = FakeKubeAPI()
    kube.sock.close()  # never started: its address refuses connections
    base = parse_config({"discovery": {"kubeconfig": str(kube.kubeconfig(tmp_path)), "backoff_s": 0.05, "initial_sync_timeout_s": 0.3}})
    with SidecarThread(sidecar_config(dec.url, [_addr(pre0)], base)) as s:
        assert _two_hop(s.url, _addr(pre0), "static-0").status_code == 200
        assert _two_hop(s.url, _addr(pre1), "static-1").status_code == 403
