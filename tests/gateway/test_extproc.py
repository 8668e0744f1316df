"""The ext-proc endpoint picker behind a real Envoy 1.40, in both processing modes.

One picker (gRPC, its own loop in a thread) serves two Envoys rendered from
deploy/envoy/envoy.template.yaml: ``buffered`` (plain Envoy) and ``full-duplex`` (what GIE
gateways configure). Three simulated replicas listed as ``http://localhost:PORT`` so the picker
must hand Envoy an IP address. Every test that routes checks the replica's own counters, so
"the picker chose X" and "X served it" are both proved.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time

import httpx
import msgspec
import openai
import pytest

from benchmarks.envoy_stack import Envoy, render
from simulator.fleet import SimConfig, SimFleet
from tests.helpers.envoy import ExtProcThread, envoy_binary, extproc_envoy
from tests.helpers.gateway import MODEL, RecordingProxy, fleet_config, metric_value, wait_for

MODES = ["buffered", "full-duplex"]
SYSTEMS = [f"System {g} " + "{tag}: " + " ".join(f"policy {g}-{i} covers case {i * 11};" for i in range(50)) for g in range(4)]


def _localhost_config(fleet, **overrides):
    cfg = fleet_config(fleet.handles, **overrides)
    for r in cfg.replicas:
        r.url = r.url.replace("127.0.0.1", "localhost")
    return cfg


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    envoy_binary()  # skip/fail early when Envoy is missing
    fleet = SimFleet([SimConfig(model=MODEL, seed=i, time_scale=1.0) for i in range(3)])
    fleet.start()
    ep = ExtProcThread(_localhost_config(fleet)).start()
    envoys = {}
    try:
        for mode in MODES:
            envoys[mode] = extproc_envoy(tmp_path_factory.mktemp(mode), ep.port, mode).start()
        wait_for(lambda: all(s.healthy for s in ep.call(ep.server.gateway.fleet.all)), message="replicas healthy")
        yield fleet, ep, envoys
    finally:
        for e in envoys.values():
            e.stop()
        ep.stop()
        fleet.stop()


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


def _served_counts(fleet) -> dict[str, float]:
    """Prompt tokens each replica processed, from its own /metrics (vllm:prompt_tokens_total)."""
    out = {}
    for i, h in enumerate(fleet.handles):
        out[f"r{i}"] = metric_value(httpx.get(f"{h.url}/metrics", timeout=5).text, "vllm:prompt_tokens_total")
    return out


def _who_served(before: dict[str, float], after: dict[str, float]) -> list[str]:
    return [r for r in before if after[r] > before[r]]


def _load(ep) -> dict:
    """The picker's accounting, read on its own loop."""

    def read():
        gw = ep.server.gateway
        return {
            "inflight": {s.id: s.inflight_requests for s in gw.fleet.all()},
            "prefill": {s.id: s.inflight_prefill_tokens for s in gw.fleet.all()},
            "decode": {s.id: s.inflight_decode_tokens for s in gw.fleet.all()},
            "admitted": gw.admission.inflight,
            "streams": ep.server.service.streams_open,
        }

    return ep.call(read)


def _idle(ep) -> bool:
    s = _load(ep)
    return not any(s["inflight"].values()) and not any(s["prefill"].values()) and not any(s["decode"].values()) and s["admitted"] == 0 and s["streams"] == 0


def _replica_of(ep, endpoint: str) -> str:
    return ep.call(lambda: ep.server.service.addresses.by_addr[endpoint])


def _access_log(envoy) -> dict[str, dict]:
    """Envoy's JSON access log lines (template: stdout, which the harness keeps), by request id."""
    out = {}
    for line in envoy.log.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            out[entry["request_id"]] = entry
    return out


def test_openai_requests_reach_the_picked_replica_with_prefix_affinity(stack, mode):
    fleet, ep, envoys = stack
    c = openai.OpenAI(base_url=f"{envoys[mode].url}/v1", api_key="x", max_retries=0, timeout=30)

    def ask(system: str, user: str) -> tuple[str, object]:
        before = _served_counts(fleet)
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": user}], max_tokens=2)
        d = ep.service.decisions[-1]
        assert _who_served(before, _served_counts(fleet)) == [d.replica]  # Envoy went where the picker said
        assert d.endpoint.startswith("127.0.0.1:")  # a name in the config, an IP for ORIGINAL_DST
        assert _replica_of(ep, d.endpoint) == d.replica
        return d.replica, r

    tag = f"{mode}-{time.monotonic_ns()}"
    systems = [s.replace("{tag}", tag) for s in SYSTEMS]  # differ from the first token on
    # cold prefixes sent together: in-flight load spreads them over the fleet (long answers, so
    # each is still in flight when the next is decided even on a busy machine)
    with concurrent.futures.ThreadPoolExecutor(len(systems)) as pool:
        list(pool.map(lambda s: c.completions.create(model=MODEL, prompt=s + " warm", max_tokens=200), systems))
    wait_for(lambda: _idle(ep), message="warm-up accounted")
    homes = {}
    for g, system in enumerate(systems):

        def indexed(g=g, system=system) -> bool:
            homes[g], _ = ask(system, f"probe {time.monotonic_ns()}")
            return ep.service.decisions[-1].prefix_blocks > 0

        wait_for(indexed, timeout=10, message="the prefix's KV events indexed")
    assert len(set(homes.values())) >= 2, f"different prefixes all went to one replica: {homes}"
    for g, system in enumerate(systems):
        for i in range(2):
            replica, r = ask(system, f"again {i}")
            assert replica == homes[g]
            assert ep.service.decisions[-1].prefix_blocks > 0
            assert r.usage.prompt_tokens_details.cached_tokens > 0  # the replica Envoy reached had it
    wait_for(lambda: _idle(ep), message="every request released")
    # Envoy's own record: the picker's answer landed in envoy.lb and Envoy connected there
    recent = [d for d in ep.service.decisions[-8:]]
    wait_for(lambda: all(d.request_id in _access_log(envoys[mode]) for d in recent), message="access log flushed")
    log = _access_log(envoys[mode])
    for d in recent:
        assert log[d.request_id]["picked"] == d.endpoint == log[d.request_id]["upstream"]


def test_responses_api_through_envoy_follows_its_prefix(stack, mode):
    """``client.responses.create`` through Envoy: the picker schedules /v1/responses like chat
    (the chat vLLM builds from instructions + input), streaming and not."""
    fleet, ep, envoys = stack
    c = openai.OpenAI(base_url=f"{envoys[mode].url}/v1", api_key="x", max_retries=0, timeout=30)
    instructions = SYSTEMS[0].replace("{tag}", f"responses-{mode}-{time.monotonic_ns()}")
    c.responses.create(model=MODEL, instructions=instructions, input="warm", max_output_tokens=4)
    home = ep.service.decisions[-1].replica

    def indexed() -> bool:
        c.responses.create(model=MODEL, instructions=instructions, input=f"probe {time.monotonic_ns()}", max_output_tokens=2)
        return ep.service.decisions[-1].prefix_blocks > 0

    wait_for(indexed, timeout=10, message="the instructions' KV events indexed")
    assert ep.service.decisions[-1].replica == home
    events = list(c.responses.create(model=MODEL, instructions=instructions, input="stream it", max_output_tokens=8, stream=True))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and events[-1].type == "response.incomplete"  # vLLM's end at max_output_tokens
    assert events[-1].response.usage.input_tokens_details.cached_tokens > 0
    assert ep.service.decisions[-1].replica == home and ep.service.decisions[-1].prefix_blocks > 0
    wait_for(lambda: _idle(ep), message="every request released")


def test_subset_hint_set_by_the_data_plane_is_honoured(stack, mode, tmp_path):
    """An Envoy that sets GIE's subset hint (as an Inference Extension gateway would) before ext_proc."""
    fleet, ep, _ = stack
    only = f"127.0.0.1:{fleet.handles[1].config.port}"
    text = render(listen=("127.0.0.1", 0), extproc=("127.0.0.1", ep.port), admin=("127.0.0.1", 0), mode=mode)  # Envoy binds them
    hook = "                  - name: envoy.filters.http.ext_proc\n"
    assert hook in text
    text = text.replace(
        hook,
        "                  - name: envoy.filters.http.set_metadata\n"
        "                    typed_config:\n"
        '                      "@type": type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config\n'
        "                      metadata:\n"
        "                        - metadata_namespace: envoy.lb.subset_hint\n"
        f'                          value: {{x-gateway-destination-endpoint-subset: ["{only}"]}}\n' + hook,
    )
    envoy = Envoy(text, tmp_path, envoy_binary()).start()
    try:
        c = openai.OpenAI(base_url=f"{envoy.url}/v1", api_key="x", max_retries=0, timeout=30)
        for i in range(4):
            before = _served_counts(fleet)
            c.completions.create(model=MODEL, prompt=f"{SYSTEMS[i % 4]} subset {mode} {i}", max_tokens=1)
            assert _who_served(before, _served_counts(fleet)) == ["r1"]
            assert ep.service.decisions[-1].endpoint == only
    finally:
        envoy.stop()
    wait_for(lambda: _idle(ep), message="released")


def test_streaming_is_incremental_and_counted_until_the_end(stack, mode):
    fleet, ep, envoys = stack
    c = openai.OpenAI(base_url=f"{envoys[mode].url}/v1", api_key="x", max_retries=0, timeout=30)
    arrivals, during = [], None
    t0 = time.perf_counter()
    stream = c.completions.create(model=MODEL, prompt=f"stream through envoy {mode}", max_tokens=40, stream=True, stream_options={"include_usage": True})
    for ch in stream:
        arrivals.append(time.perf_counter() - t0)
        last = ch
        if len(arrivals) == 5:
            during = _load(ep)
    d = ep.service.decisions[-1]
    assert last.usage.completion_tokens == 40
    assert len(arrivals) >= 40
    # 40 decode steps of ~7 ms each: the first tokens arrive long before the last one
    assert arrivals[-1] - arrivals[0] > 0.15, arrivals
    assert arrivals[4] < arrivals[-1] - 0.1
    # while streaming: counted on the picked replica, its prefill already released
    assert during["inflight"][d.replica] == 1 and sum(during["inflight"].values()) == 1
    assert during["prefill"][d.replica] == 0 and during["decode"][d.replica] > 0
    assert during["admitted"] == 1
    wait_for(lambda: _idle(ep), message="stream released")


def test_client_leaving_mid_stream_releases_the_count(stack, mode):
    fleet, ep, envoys = stack
    body = {"model": MODEL, "prompt": f"leave early {mode}", "max_tokens": 400, "stream": True}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{envoys[mode].url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            while not next(lines).startswith("data:"):
                pass
            assert sum(_load(ep)["inflight"].values()) == 1
    wait_for(lambda: _idle(ep), timeout=5, message="count released after the client left")


def test_bad_requests_get_openai_errors(stack, mode):
    fleet, ep, envoys = stack
    url = envoys[mode].url
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{broken", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == "invalid_request" and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{url}/v1/completions", content=b"", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/nope", json={"model": MODEL})
    assert r.status_code == 404
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)
    with pytest.raises(openai.NotFoundError, match="nope"):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model=MODEL, messages="not a list")
    assert exc.value.body["param"] == "messages" or "messages" in exc.value.message
    # GET without a body: routed to a healthy replica at the headers
    models = httpx.get(f"{url}/v1/models")
    assert models.status_code == 200 and models.json()["data"][0]["id"] == MODEL
    wait_for(lambda: _idle(ep), message="no count left behind by errors")


def test_large_body_goes_through(stack, mode):
    """A 1.5 MB prompt: over Envoy's default 1 MiB buffer, chunked back in full-duplex mode."""
    fleet, ep, envoys = stack
    r = httpx.post(f"{envoys[mode].url}/v1/completions", json={"model": MODEL, "prompt": "word " * 300_000, "max_tokens": 1}, timeout=60)
    # the replica itself refuses (context length): proof that the whole body reached it
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"], r.text[:300]
    wait_for(lambda: _idle(ep), message="released")


def test_picker_passes_envoy_grpc_health_checks(stack):
    fleet, ep, envoys = stack
    for e in envoys.values():
        stats = httpx.get(f"http://127.0.0.1:{e.admin_port}/stats?filter=kvgate_extproc.health_check").text
        assert "cluster.kvgate_extproc.health_check.success: " in stats
        success = int(stats.split("cluster.kvgate_extproc.health_check.success: ")[1].split()[0])
        failure = int(stats.split("cluster.kvgate_extproc.health_check.failure: ")[1].split()[0])
        assert success >= 1 and failure == 0


# -- failures: a replica down, a full admission queue ------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_no_healthy_replica_is_503_and_a_dead_pick_is_released(tmp_path, mode):
    envoy_binary()
    fleet = SimFleet([SimConfig(model=MODEL, time_scale=0.02)])
    fleet.start()
    # slow health probes: the picker still believes in the replica after it died
    ep = ExtProcThread(fleet_config(fleet.handles, health={"interval_s": 60.0, "failure_threshold": 1, "cooldown_s": 60.0})).start()
    envoy = extproc_envoy(tmp_path, ep.port, mode).start()
    try:
        wait_for(lambda: ep.call(lambda: ep.server.gateway.fleet.get("r0").healthy), message="replica healthy")
        fleet.kill(0)
        # the picker routes to the dead replica; Envoy cannot connect and answers 503 itself
        r = httpx.post(f"{envoy.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503
        wait_for(lambda: _idle(ep), message="failed dispatch released")
        # once the picker knows (here: its circuit opened by hand), the 503 is its own, in OpenAI form
        ep.call(lambda: ep.server.gateway.fleet.record_failure("r0"))
        assert not ep.call(lambda: ep.server.gateway.fleet.get("r0").healthy)
        r = httpx.post(f"{envoy.url}/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_replica"
        assert r.json()["error"]["type"] == "service_unavailable_error"
        r = httpx.get(f"{envoy.url}/v1/models")
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_replica"
        wait_for(lambda: _idle(ep), message="nothing counted")
    finally:
        envoy.stop()
        ep.stop()
        fleet.stop()


def test_replica_dying_mid_stream_releases_the_count(tmp_path):
    envoy_binary()
    fleet = SimFleet([SimConfig(model=MODEL, time_scale=1.0)])
    fleet.start()
    ep = ExtProcThread(fleet_config(fleet.handles, health={"interval_s": 60.0})).start()
    envoy = extproc_envoy(tmp_path, ep.port, "full-duplex").start()
    try:
        wait_for(lambda: ep.call(lambda: ep.server.gateway.fleet.get("r0").healthy), message="replica healthy")
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", f"{envoy.url}/v1/completions", json={"model": MODEL, "prompt": "die", "max_tokens": 500, "stream": True}) as r:
                lines = r.iter_lines()
                while not next(lines).startswith("data:"):
                    pass
                assert _load(ep)["inflight"]["r0"] == 1
                fleet.kill(0)
                with pytest.raises(httpx.HTTPError):
                    for _ in lines:
                        pass
        wait_for(lambda: _idle(ep), timeout=5, message="count released after the upstream reset")
    finally:
        envoy.stop()
        ep.stop()
        fleet.stop()


def test_full_admission_queue_is_429(tmp_path):
    envoy_binary()
    fleet = SimFleet([SimConfig(model=MODEL, time_scale=1.0)])
    fleet.start()
    ep = ExtProcThread(fleet_config(fleet.handles, limits={"max_inflight": 1, "max_queue": 0})).start()
    envoy = extproc_envoy(tmp_path, ep.port, "buffered").start()
    try:
        wait_for(lambda: ep.call(lambda: ep.server.gateway.fleet.get("r0").healthy), message="replica healthy")
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", f"{envoy.url}/v1/completions", json={"model": MODEL, "prompt": "hold", "max_tokens": 300, "stream": True}) as held:
                lines = held.iter_lines()
                while not next(lines).startswith("data:"):
                    pass
                c = openai.OpenAI(base_url=f"{envoy.url}/v1", api_key="x", max_retries=0, timeout=30)
                with pytest.raises(openai.RateLimitError) as exc:
                    c.completions.create(model=MODEL, prompt="shed me", max_tokens=1)
                assert exc.value.response.headers["retry-after"] == "1"
                assert exc.value.body["code"] == "queue_full"
        wait_for(lambda: _idle(ep), message="slot released")
        r = httpx.post(f"{envoy.url}/v1/completions", json={"model": MODEL, "prompt": "now fine", "max_tokens": 1})
        assert r.status_code == 200
    finally:
        envoy.stop()
        ep.stop()
        fleet.stop()


def test_extproc_command_serves_envoy(tmp_path):
    """`kvgate extproc --config ... --port P` as its own process, behind Envoy."""
    import subprocess
    import sys

    envoy_binary()
    fleet = SimFleet([SimConfig(model=MODEL, time_scale=0.02)])
    fleet.start()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        msgspec.json.encode({"replicas": [{"id": "r0", "url": fleet.handles[0].url, "models": [MODEL]}], "models": {MODEL: {"tokenizer": "demo"}}}).decode()
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "extproc", "--config", str(cfg), "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    envoy = None
    try:
        envoy = extproc_envoy(tmp_path, port, "buffered").start()

        def answered() -> bool:
            return httpx.post(f"{envoy.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}).status_code == 200

        wait_for(answered, timeout=20, message="kvgate extproc answering through Envoy")
    finally:
        if envoy is not None:
            envoy.stop()
        proc.terminate()
        assert proc.wait(10) == 0, proc.stderr.read().decode()[-2000:]
        fleet.stop()


# -- upstream credentials: the replica's key in, the client's key out ----------------------------

REPLICA_KEY = "replica-key-for-envoy"
CLIENT_KEY = "client-key-for-the-picker"


def _auth_mutation(resp) -> tuple[str | None, list[str], list[str]]:
    """(authorization set, headers removed, endpoints listed) of a routing answer."""
    common = getattr(resp, resp.WhichOneof("response")).response
    mutation = common.header_mutation
    auth = next((h.header.raw_value.decode() for h in mutation.set_headers if h.header.key == "authorization"), None)
    dest = next(h.header.raw_value.decode() for h in mutation.set_headers if h.header.key == "x-gateway-destination-endpoint")
    # every answer also removes x-prefiller-host-port (no P/D here): not part of the key rules
    return auth, [h for h in mutation.remove_headers if h not in ("x-prefiller-host-port", "x-data-parallel-rank")], dest.split(",")


def test_picker_sets_the_replica_key_and_removes_the_clients_grpc(tmp_path):
    """Over gRPC, message by message: keyed replica -> its key set; open replica -> header removed;
    fallbacks only where the primary's key fits; a replica's 401 becomes the picker's 502."""
    import asyncio

    from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2

    from tests.helpers.extproc import (
        Conversation,
        body_msg,
        headers_msg,
        prompt_bytes,
        response_headers_msg,
        set_metadata,
    )

    M = processing_mode_pb2.ProcessingMode
    fleet = SimFleet(
        [
            SimConfig(model=MODEL, time_scale=0.0, api_key=REPLICA_KEY),
            SimConfig(model=MODEL, time_scale=0.0),
            SimConfig(model=MODEL, time_scale=0.0, api_key=REPLICA_KEY),
        ]
    )
    fleet.start()
    # no periodic probe: its next success would clear the 401 flag this test checks
    cfg = fleet_config(fleet.handles, auth={"api_keys": [CLIENT_KEY]}, health={"interval_s": 3600.0})
    cfg.replicas[0].api_key = cfg.replicas[2].api_key = REPLICA_KEY
    ep = ExtProcThread(cfg, fallbacks=2).start()
    addr = [f"127.0.0.1:{h.config.port}" for h in fleet.handles]
    client_auth = (("authorization", f"Bearer {CLIENT_KEY}"),)

    def with_subset(req, ids):
        set_metadata(req, {"envoy.lb.subset_hint": {"x-gateway-destination-endpoint-subset": [addr[i] for i in ids]}})
        return req

    async def route(ids, mode=M.BUFFERED, path="/v1/completions"):
        async with Conversation(ep.port) as c:
            if path == "/v1/models":
                [r] = await c.send(with_subset(headers_msg(path, eos=True, extra=client_auth), ids), 1)
            elif mode == M.BUFFERED:
                await c.send(with_subset(headers_msg(extra=client_auth), ids), 1)
                [r] = await c.send(body_msg(prompt_bytes("who gets which key"), eos=True), 1)
            else:
                await c.send(with_subset(headers_msg(request_mode=M.FULL_DUPLEX_STREAMED, extra=client_auth), ids), 0)
                r, _ = await c.send(body_msg(prompt_bytes("who gets which key"), eos=True), 2)
            await c.send(response_headers_msg(200, eos=True), 1)
            await c.close()
            return r

    try:
        wait_for(lambda: all(s.healthy for s in ep.call(ep.server.gateway.fleet.all)), message="replicas healthy")
        for mode in (M.BUFFERED, M.FULL_DUPLEX_STREAMED):
            assert _auth_mutation(asyncio.run(route([0], mode))) == (f"Bearer {REPLICA_KEY}", [], [addr[0]])
            assert _auth_mutation(asyncio.run(route([1], mode))) == (None, ["authorization"], [addr[1]])
        assert _auth_mutation(asyncio.run(route([1], path="/v1/models"))) == (None, ["authorization"], [addr[1]])
        assert _auth_mutation(asyncio.run(route([2], path="/v1/models")))[0] == f"Bearer {REPLICA_KEY}"
        # fallbacks: the data plane retries with the same headers, so only same-key endpoints follow
        auth, removed, listed = _auth_mutation(asyncio.run(route([0, 2])))
        assert auth == f"Bearer {REPLICA_KEY}" and sorted(listed) == sorted([addr[0], addr[2]])
        auth, removed, listed = _auth_mutation(asyncio.run(route([0, 1])))
        assert len(listed) == 1 and (auth, removed) == ((f"Bearer {REPLICA_KEY}", []) if listed == [addr[0]] else (None, ["authorization"]))

        async def refused():
            async with Conversation(ep.port) as c:
                await c.send(with_subset(headers_msg(extra=client_auth), [0]), 1)
                await c.send(body_msg(prompt_bytes("refused"), eos=True), 1)
                [r] = await c.send(response_headers_msg(401), 1, then_end=True)
                return r

        r = asyncio.run(refused())
        assert r.immediate_response.status.code == 502
        err = msgspec.json.decode(r.immediate_response.body)["error"]
        assert err["code"] == "upstream_auth_failed" and "replica r0 rejected the gateway's credentials" in err["message"]
        assert ep.call(lambda: ep.server.gateway.fleet.get("r0").healthy)
        assert ep.call(lambda: "r0" in ep.server.gateway.fleet.auth_rejected)
        wait_for(lambda: _idle(ep), message="nothing left counted")
    finally:
        ep.stop()
        fleet.stop()


@pytest.mark.parametrize("mode", MODES)
def test_envoy_sends_the_replica_key_never_the_clients(tmp_path, mode):
    """Through a real Envoy: the keyed replica (vLLM --api-key) answers because the picker set its
    key; recording proxies in front of the replicas show what Envoy actually sent upstream."""
    envoy_binary()
    fleet = SimFleet([SimConfig(model=MODEL, time_scale=0.0, api_key=REPLICA_KEY), SimConfig(model=MODEL, time_scale=0.0)])
    fleet.start()
    proxies = [RecordingProxy(h.url).start() for h in fleet.handles]
    cfg = fleet_config(fleet.handles, auth={"api_keys": [CLIENT_KEY]}, scheduling={"default_profile": "round-robin"})
    for r, p in zip(cfg.replicas, proxies):
        r.url = p.url
    cfg.replicas[0].api_key = REPLICA_KEY
    wrong = fleet_config(fleet.handles[:1])
    wrong.replicas[0].api_key = "not-the-key"
    ep, bad, envoy, bad_envoy = ExtProcThread(cfg).start(), ExtProcThread(wrong).start(), None, None
    try:
        (tmp_path / "good").mkdir()
        (tmp_path / "bad").mkdir()
        envoy = extproc_envoy(tmp_path / "good", ep.port, mode).start()
        bad_envoy = extproc_envoy(tmp_path / "bad", bad.port, mode).start()
        wait_for(lambda: all(s.healthy for s in ep.call(ep.server.gateway.fleet.all)), message="replicas healthy")
        c = openai.OpenAI(base_url=f"{envoy.url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30)
        for i in range(4):  # three calls a round, round-robin over two replicas: each sees each kind
            assert c.completions.create(model=MODEL, prompt=f"keyed through envoy {i}", max_tokens=2).usage.completion_tokens == 2
            chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"s{i}"}], max_tokens=2, stream=True))
            assert chunks[-1].choices[0].finish_reason == "length"
            assert c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"n{i}"}], max_tokens=2).choices[0].message.content
        with pytest.raises(openai.AuthenticationError):  # the picker still checks the client's key
            openai.OpenAI(base_url=f"{envoy.url}/v1", api_key=REPLICA_KEY, max_retries=0).completions.create(model=MODEL, prompt="x", max_tokens=1)
        served = []
        for proxy, expected in zip(proxies, (f"Bearer {REPLICA_KEY}", None)):
            posts = [(e["path"], e["headers"], e["status"]) for e in proxy.exchanges if e["method"] == "POST"]
            # round-robin gives each about half; a health probe that times out on a busy machine can skip a turn
            assert {p for p, _, _ in posts} == {"/v1/chat/completions", "/v1/completions"}, posts
            assert all(status == 200 and headers.get("authorization") == expected for _, headers, status in posts)
            served += [p for p, _, _ in posts]
            assert CLIENT_KEY not in json.dumps([e["headers"] for e in proxy.exchanges])
        assert sorted(served) == ["/v1/chat/completions"] * 8 + ["/v1/completions"] * 4
        # a picker holding the wrong key: Envoy's client gets the 502, not the replica's 401
        wait_for(lambda: bad.call(lambda: bad.server.gateway.fleet.get("r0").healthy), message="healthy")
        r = httpx.post(f"{bad_envoy.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}, timeout=30)
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_auth_failed", r.text
        assert bad.call(lambda: bad.server.gateway.fleet.get("r0").healthy)
        wait_for(lambda: _idle(ep) and _idle(bad), message="released")
    finally:
        for e in (envoy, bad_envoy):
            if e is not None:
                e.stop()
        ep.stop()
        bad.stop()
        for p in proxies:
            p.stop()
        fleet.stop()
