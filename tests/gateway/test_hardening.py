"""What one client can do to the gateway and to everyone else, and must not (issue 12).

Each test reproduces one attack from the hardening report against a real gateway on loopback
with simulated replicas, and checks that the client gets a clear OpenAI-style answer while the
fleet, the admission slots and the other clients are unaffected.
"""

from __future__ import annotations

import json
import socket
import time
import uuid

import httpx
import msgspec
import openai
import pytest

from simulator.fleet import SimConfig, SimFleet
from tests.helpers.gateway import MODEL, GatewayThread, RecordingProxy, fleet_config, fleet_fixture, get_metrics, metric_value, recorded_gateway, wait_for

LONG_DOC = " ".join(f"clause {i} says item {i} costs {i * 3} coins;" for i in range(120))


fleet = fleet_fixture(2, time_scale=0.02)


@pytest.fixture(scope="module")
def recorded(fleet):
    """The fleet behind recording proxies (what each replica receives), with its own gateway."""
    with recorded_gateway(fleet.handles, forward_headers=["x-tenant"]) as stack:
        yield stack


def _posts(proxies: list[RecordingProxy], rid: str) -> list[dict]:
    return [e for p in proxies for e in p.posts() if e["headers"].get("x-request-id") == rid]


def _error(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and isinstance(err["code"], str), err
    return err


# -- 1. request ids ---------------------------------------------------------------------------


def test_an_8kb_request_id_is_replaced_and_never_opens_a_circuit(recorded):
    g, proxies = recorded
    for _ in range(6):
        r = httpx.post(f"{g.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, headers={"x-request-id": "x" * 8192}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"].startswith("kvg-") and len(r.headers["x-request-id"]) < 64
    assert all(s.healthy for s in g.call(_states(g)))
    assert httpx.get(f"{g.url}/ready", timeout=5).json()["ready"] is True
    assert metric_value(get_metrics(g.url), "kvgate_retries_total") == 0
    # a sane id is kept, end to end
    rid = f"client-{uuid.uuid4()}"
    r = httpx.post(f"{g.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, headers={"x-request-id": rid}, timeout=30)
    assert r.headers["x-request-id"] == rid and len(_posts(proxies, rid)) == 1


def _states(g):
    async def read():
        return g.gateway.fleet.all()

    return read()


@pytest.mark.parametrize("rid", ["a b", "x;y", "<script>", "a" * 129, ""])
def test_odd_request_ids_are_replaced(recorded, rid):
    g, _ = recorded
    r = httpx.post(f"{g.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1}, headers={"x-request-id": rid}, timeout=30)
    assert r.status_code == 200 and r.headers["x-request-id"] != rid and r.headers["x-request-id"].startswith("kvg-")


# -- 3. fields only the gateway sets ------------------------------------------------------------


def test_client_kv_transfer_params_never_reach_a_replica(recorded):
    g, proxies = recorded
    rid = f"kv-{uuid.uuid4().hex}"
    evil = {"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": 9, "remote_engine_id": "x", "remote_block_ids": [1, 2]}
    r = httpx.post(
        f"{g.url}/v1/completions",
        json={"model": MODEL, "prompt": "hello", "max_tokens": 2, "kv_transfer_params": evil},
        headers={"x-request-id": rid},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    [sent] = _posts(proxies, rid)
    assert "kv_transfer_params" not in sent["body"] and sent["body"]["prompt"] == "hello"
    assert r.json().get("kv_transfer_params") is None  # the replica handed nothing back either


# -- 8. headers a replica gets --------------------------------------------------------------------


def test_only_allowed_headers_reach_a_replica(recorded):
    g, proxies = recorded
    rid = f"hdr-{uuid.uuid4().hex}"
    headers = {
        "x-request-id": rid,
        "cookie": "session=secret",
        "x-api-key": "another-service-key",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "x-tenant": "acme",
        "x-tenant-huge": "y" * 100,
        "user-agent": "evil/1.0",
    }
    r = httpx.post(f"{g.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1}, headers=headers, timeout=30)
    assert r.status_code == 200
    [sent] = _posts(proxies, rid)
    got = sent["headers"]
    assert "cookie" not in got and "x-api-key" not in got and "x-tenant-huge" not in got and got.get("user-agent") != "evil/1.0"
    assert got["traceparent"] == headers["traceparent"] and got["x-tenant"] == "acme"  # forward_headers: [x-tenant]


def test_oversized_allowed_header_is_dropped_not_forwarded(recorded):
    g, proxies = recorded
    rid = f"big-{uuid.uuid4().hex}"
    r = httpx.post(
        f"{g.url}/v1/completions",
        json={"model": MODEL, "prompt": "hi", "max_tokens": 1},
        headers={"x-request-id": rid, "tracestate": "k=" + "v" * 9000},
        timeout=30,
    )
    assert r.status_code == 200
    [sent] = _posts(proxies, rid)
    assert "tracestate" not in sent["headers"]


def test_forward_headers_cannot_name_what_the_gateway_owns():
    from gateway.config import ConfigError, parse_config

    for name in ("Authorization", "x-request-id", "cookie"):
        with pytest.raises(ConfigError, match="forward_headers"):
            parse_config({"forward_headers": [name]})


# -- 5. bodies that used to be a 500 ----------------------------------------------------------


@pytest.mark.parametrize("depth", [100, 990, 5000])
def test_deeply_nested_json_is_a_400(recorded, depth):
    g, _ = recorded
    nested = "[" * depth + "]" * depth
    raw = f'{{"model": "{MODEL}", "prompt": "hi", "max_tokens": 1, "stop": {nested}}}'.encode()
    r = httpx.post(f"{g.url}/v1/completions", content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    assert "deeper than" in _error(r)["message"]


def test_tool_schema_nesting_is_fine(recorded):
    g, _ = recorded
    schema: dict = {"type": "string"}
    for _ in range(20):
        schema = {"type": "object", "properties": {"x": schema}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    r = httpx.post(
        f"{g.url}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "tools": tools}, timeout=30
    )
    assert r.status_code == 200, r.text


# -- 10. one error shape --------------------------------------------------------------------------


def test_replica_errors_leave_in_the_gateways_shape(recorded):
    g, _ = recorded
    # the simulator (like vLLM) rejects this itself: {"error": {"type": "BadRequestError", "code": 400}}
    r = httpx.post(f"{g.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1, "temperature": "hot"}, timeout=30)
    assert r.status_code == 400, r.text
    err = _error(r)
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_request" and err["message"]
    with pytest.raises(openai.BadRequestError) as info:
        openai.OpenAI(base_url=f"{g.url}/v1", api_key="x", max_retries=0).completions.create(model=MODEL, prompt="hi", max_tokens=1, temperature="hot")
    assert info.value.code == "invalid_request"


def test_malformed_http_gets_a_json_400(recorded):
    g, _ = recorded
    with socket.create_connection(("127.0.0.1", g.port), timeout=5) as s:
        s.sendall(b"NOT-HTTP \x00\x01\r\n\r\n")
        data = _read_all(s)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
    assert msgspec.json.decode(body)["error"]["type"] == "invalid_request_error"


def _read_all(s: socket.socket, deadline_s: float = 5.0) -> bytes:
    out = b""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    return out


# -- 6. slow clients ------------------------------------------------------------------------------


@pytest.fixture
def strict(fleet):
    cfg = fleet_config(fleet.handles, limits={"header_timeout_s": 0.5, "body_timeout_s": 0.5, "max_connections": 8})
    with GatewayThread(cfg) as g:
        yield g


def test_slowloris_headers_are_cut_off_with_a_408(strict):
    with socket.create_connection(("127.0.0.1", strict.port), timeout=5) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
        t0 = time.monotonic()
        for i in range(40):  # one header line every 50 ms, never finishing
            try:
                s.sendall(f"x-slow-{i}: y\r\n".encode())
            except OSError:
                break
            time.sleep(0.05)
        data = _read_all(s)
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"] == "header_timeout"
    assert time.monotonic() - t0 < 2.5


def test_idle_connection_without_a_request_is_closed(strict):
    with socket.create_connection(("127.0.0.1", strict.port), timeout=5) as s:
        t0 = time.monotonic()
        data = _read_all(s)
    assert data.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 2.5


def test_slow_body_is_cut_off_with_a_408(strict):
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode()
    with socket.create_connection(("127.0.0.1", strict.port), timeout=5) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body))
        s.sendall(body[:5])  # and the rest never
        data = _read_all(s)
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b"body_timeout" in data
    assert b"connection: close" in data.lower()  # closed at once, not after uvicorn's keep-alive
    wait_for(lambda: strict.gateway.admission.inflight == 0, timeout=3, message="no slot held")


def test_connections_past_the_cap_get_a_503_and_others_still_work(strict):
    held = [socket.create_connection(("127.0.0.1", strict.port), timeout=5) for _ in range(8)]
    try:
        with socket.create_connection(("127.0.0.1", strict.port), timeout=5) as s:
            data = _read_all(s)
        assert data.startswith(b"HTTP/1.1 503") and b"too_many_connections" in data
    finally:
        for s in held:
            s.close()
    # the held ones are gone (or timed out): a normal request is served again
    wait_for(
        lambda: httpx.post(f"{strict.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1}, timeout=5).status_code == 200,
        timeout=5,
        message="served after the flood",
    )


# -- 4. clients leaving before the answer --------------------------------------------------------


def _send_and_leave(port: int, body: dict, after_s: float) -> None:
    """Send a whole request, then close the socket ``after_s`` later without reading."""
    raw = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(raw), raw))
    time.sleep(after_s)
    s.close()


@pytest.fixture(scope="module")
def long_context():
    """Replicas whose context fits the long prompts below (the gateway refuses longer ones early)."""
    f = SimFleet([SimConfig(model=MODEL, seed=i, time_scale=0.02, max_model_len=1_000_000) for i in range(2)])
    f.start()
    yield f
    f.stop()


@pytest.mark.parametrize("after_s", [0.0, 0.005, 0.02])
def test_clients_leaving_during_routing_never_reach_a_replica(long_context, after_s):
    """Ten clients close 0–20 ms after sending a long prompt (its tokenization takes longer):
    none of them may be dispatched, and every slot comes back at once."""
    with recorded_gateway(long_context.handles, limits={"max_inflight": 4}) as (g, proxies):
        prompt = LONG_DOC * 40  # ~48k words: tens of ms to tokenize
        for i in range(10):
            _send_and_leave(g.port, {"model": MODEL, "prompt": f"{i} {prompt}", "max_tokens": 2000, "stream": True}, after_s)
        wait_for(lambda: g.gateway.admission.inflight == 0 and g.gateway.admission.waiting == 0, timeout=10, message="every slot back")
        time.sleep(0.3)  # anything dispatched late would show now
        reached = sum(len(p.posts()) for p in proxies)
        assert reached == 0, f"{reached} of 10 abandoned requests were sent to a replica"
        assert metric_value(get_metrics(g.url), "kvgate_errors_total", {"code": "client_disconnected"}) >= 1
        # and the gateway still serves (on a busy machine the 48k-word tokenizations can delay its
        # 0.5 s health probes past their timeout: once they see the replicas again)
        wait_for(lambda: all(s.healthy for s in g.gateway.fleet.all()), timeout=10, message="replicas healthy again")
        r = httpx.post(f"{g.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1}, timeout=30)
        assert r.status_code == 200


def test_client_leaving_while_queued_for_admission_is_never_dispatched(fleet):
    slow = SimFleet([SimConfig(model=MODEL, seed=9, time_scale=1.0)])
    slow.start()
    proxy = RecordingProxy(slow.handles[0].url).start()
    cfg = fleet_config(slow.handles, limits={"max_inflight": 1})
    cfg.replicas[0].url = proxy.url
    try:
        with GatewayThread(cfg) as g:
            with httpx.stream("POST", f"{g.url}/v1/completions", json={"model": MODEL, "prompt": "hold", "max_tokens": 400, "stream": True}, timeout=30) as r:
                chunks = r.iter_bytes()  # kept: a dropped iterator closes the stream
                next(chunks)  # the only slot is taken
                _send_and_leave(g.port, {"model": MODEL, "prompt": "queued", "max_tokens": 2}, 0.2)
                wait_for(lambda: g.gateway.admission.waiting == 0, timeout=3, message="the leaver left the queue")
            wait_for(lambda: g.gateway.admission.inflight == 0, timeout=5, message="slot back")
            assert [e["body"]["prompt"] for e in proxy.posts()] == ["hold"]
    finally:
        proxy.stop()
        slow.stop()
