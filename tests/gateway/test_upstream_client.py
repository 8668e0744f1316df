"""The gateway's own upstream HTTP/1.1 client (gateway/proxy.py) against a scripted server.

A real asyncio server on 127.0.0.1 (port 0) answers each request with bytes the test chooses,
so what a replica may do on the wire — keep-alive or not, a length, chunks, a body that ends
with the connection, a 100 Continue, a stall, a reset, garbage — is played for real, and the
server reports what it saw (connections, request heads, when a connection closed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import httpx
import pytest
import uvloop

from gateway.config import LimitsConfig
from gateway.fleet import parse_vllm_metrics
from gateway.proxy import (
    ProbeClient,
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamPool,
    UpstreamTimeout,
    open_upstream,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    """Each test on both loops: the gateway serves on uvloop (whose transports are no
    asyncio.Transport), its tests' helpers on either."""
    return asyncio.run if request.param == "asyncio" else uvloop.run


#: a script: called per request with (connection number, request number on it, the writer); it
#: writes the answer (and may wait, close, or never answer)
Script = Callable[[int, int, asyncio.StreamWriter], "asyncio.Future[None] | object"]


class Scripted:
    """A TCP server that reads request heads (and bodies by content-length) and runs ``script``."""

    def __init__(self, script) -> None:
        self.script = script
        self.connections = 0
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.closed = 0  # connections whose client side closed
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        n = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.closed += 1
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                self.heads.append(head)
                self.bodies.append(await reader.readexactly(length) if length else b"")
                n += 1
                out = self.script(conn, n, writer)
                if asyncio.iscoroutine(out):
                    await out
                if writer.is_closing():
                    return
        finally:
            writer.close()


def pool(**kw) -> UpstreamPool:
    return UpstreamPool(connect_timeout_s=kw.pop("connect_timeout_s", 2.0), keepalive_s=kw.pop("keepalive_s", 4.0), **kw)


def ok(body: bytes = b'{"ok":true}', extra: bytes = b"") -> Callable[[int, int, asyncio.StreamWriter], None]:
    def answer(conn: int, n: int, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body))

    return answer


async def post(p: UpstreamPool, url: str, body: bytes = b"{}", timeout: float = 5.0, headers: dict[str, str] | None = None):
    return await open_upstream(
        p, "POST", url + "/v1/completions", content=body, headers=headers or {"content-type": "application/json"}, first_byte_timeout_s=timeout
    )


def test_keep_alive_reuses_one_connection_and_sends_a_sane_head(run) -> None:
    run(_keep_alive_reuses_one_connection_and_sends_a_sane_head())


async def _keep_alive_reuses_one_connection_and_sends_a_sane_head() -> None:
    async with Scripted(ok()) as srv:
        p = pool()
        for i in range(3):
            resp = await post(p, srv.url, b'{"i":%d}' % i, headers={"content-type": "application/json", "x-request-id": f"r{i}", "bad": "a\r\nb"})
            assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
            assert await resp.aread() == b'{"ok":true}'
            await resp.aclose()
        assert srv.connections == 1
        head = srv.heads[2].decode()
        assert head.startswith("POST /v1/completions HTTP/1.1\r\n")
        assert f"Host: {srv.url.removeprefix('http://')}\r\n" in head
        assert "x-request-id: r2\r\n" in head and "content-length: 7\r\n" in head and "accept: */*\r\n" in head
        assert "bad" not in head  # a value with CR/LF is left out, never injected
        assert srv.bodies == [b'{"i":0}', b'{"i":1}', b'{"i":2}']
        await p.close()


def test_an_idle_connection_past_the_keepalive_is_never_reused_and_is_closed(run) -> None:
    run(_an_idle_connection_past_the_keepalive_is_never_reused_and_is_closed())


async def _an_idle_connection_past_the_keepalive_is_never_reused_and_is_closed() -> None:
    async with Scripted(ok()) as srv:
        p = pool(keepalive_s=0.2)
        await (await post(p, srv.url)).aread()
        await asyncio.sleep(0.35)  # the sweep closes it; a request would not take it anyway
        assert srv.closed == 1
        await (await post(p, srv.url)).aread()
        assert srv.connections == 2
        await p.close()


def test_connection_close_and_http10_bodies_are_not_pooled(run) -> None:
    run(_connection_close_and_http10_bodies_are_not_pooled())


async def _connection_close_and_http10_bodies_are_not_pooled() -> None:
    def answer(conn: int, n: int, w: asyncio.StreamWriter) -> None:
        if conn == 1:
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi")
        else:  # no length, not chunked: the body ends with the connection
            w.write(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end")
            w.close()

    async with Scripted(answer) as srv:
        p = pool()
        assert await (await post(p, srv.url)).aread() == b"hi"
        assert await (await post(p, srv.url)).aread() == b"until the end"
        assert srv.connections == 2
        await (await post(p, srv.url)).aread()
        assert srv.connections == 3
        await p.close()


def test_a_chunked_stream_is_read_chunk_by_chunk_and_the_connection_goes_back(run) -> None:
    run(_a_chunked_stream_is_read_chunk_by_chunk_and_the_connection_goes_back())


async def _a_chunked_stream_is_read_chunk_by_chunk_and_the_connection_goes_back() -> None:
    async def stream(conn: int, n: int, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(3):
            ev = b"data: %d\n\n" % i
            w.write(b"%x\r\n%s\r\n" % (len(ev), ev))
            await w.drain()
            await asyncio.sleep(0.02)
        w.write(b"0\r\n\r\n")

    async with Scripted(stream) as srv:
        p = pool()
        resp = await post(p, srv.url)
        assert resp.is_sse
        assert await resp.first_chunk() == b"data: 0\n\n"
        rest = [c async for c in resp.aiter_raw()]
        assert b"".join(rest) == b"data: 1\n\ndata: 2\n\n"
        await resp.aclose()
        resp = await post(p, srv.url)  # same connection, whole answer again
        assert await resp.aread() == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        assert srv.connections == 1
        await p.close()


def test_relay_hands_chunks_to_the_sink_and_a_full_client_pauses_reading(run) -> None:
    run(_relay_hands_chunks_to_the_sink_and_a_full_client_pauses_reading())


async def _relay_hands_chunks_to_the_sink_and_a_full_client_pauses_reading() -> None:
    events = [b"data: %d\n\n" % i for i in range(20)]

    async def stream(conn: int, n: int, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for ev in events:
            w.write(b"%x\r\n%s\r\n" % (len(ev), ev))
            await w.drain()
            await asyncio.sleep(0.005)
        w.write(b"0\r\n\r\n")

    async with Scripted(stream) as srv:
        p = pool()
        resp = await post(p, srv.url)
        got: list[bytes] = []
        drains = 0
        full = asyncio.Event()
        full.set()

        def sink(chunk: bytes) -> bool:
            got.append(chunk)
            if len(got) % 5 == 0:  # every fifth chunk the "client" is full for a while
                full.clear()
                asyncio.get_running_loop().call_later(0.03, full.set)
                return True
            return False

        async def drain() -> None:
            nonlocal drains
            drains += 1
            await full.wait()

        await resp.relay(sink, drain)
        assert b"".join(got) == b"".join(events)
        assert drains >= 3
        await resp.aclose()
        await p.close()


def test_a_stalled_body_times_out_and_a_reset_breaks_it(run) -> None:
    run(_a_stalled_body_times_out_and_a_reset_breaks_it())


async def _a_stalled_body_times_out_and_a_reset_breaks_it() -> None:
    async def stall(conn: int, n: int, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await w.drain()
        if conn == 1:
            await asyncio.sleep(2)  # nothing more: the gap timeout fires
        else:
            w.transport.abort()  # reset mid-body

    async with Scripted(stall) as srv:
        p = pool()
        resp = await post(p, srv.url)
        assert await resp.first_chunk() == b"first"
        resp.set_read_timeout(0.2)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(UpstreamTimeout):
            async for _ in resp.aiter_raw():
                pass
        assert 0.15 < loop.time() - t0 < 1.5
        await resp.aclose()
        resp = await post(p, srv.url)
        with pytest.raises(UpstreamBroken):
            await resp.aread()
        await resp.aclose()
        await p.close()


def test_failures_before_the_answer_say_whether_the_replica_had_the_request(run) -> None:
    run(_failures_before_the_answer_say_whether_the_replica_had_the_request())


async def _failures_before_the_answer_say_whether_the_replica_had_the_request() -> None:
    p = pool(connect_timeout_s=1.0)
    # nobody listens: never reached a replica
    async with Scripted(ok()) as srv:
        url = srv.url
    with pytest.raises(UpstreamConnectError) as e:
        await post(p, url)
    assert e.value.accepted is False

    def hang_up(conn: int, n: int, w: asyncio.StreamWriter) -> None:
        w.close()  # took the request, answered nothing

    async with Scripted(hang_up) as srv:
        with pytest.raises(UpstreamConnectError) as e:
            await post(p, srv.url)
        assert e.value.accepted is True

    def garbage(conn: int, n: int, w: asyncio.StreamWriter) -> None:
        w.write(b"SPDY/9 what\r\n\r\n")

    async with Scripted(garbage) as srv:
        with pytest.raises(UpstreamConnectError) as e:
            await post(p, srv.url)
        assert e.value.accepted is True

    async def slow(conn: int, n: int, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(2)

    async with Scripted(slow) as srv:
        with pytest.raises(UpstreamTimeout):
            await post(p, srv.url, timeout=0.2)
    await p.close()


def test_closing_an_unfinished_answer_drops_the_connection(run) -> None:
    run(_closing_an_unfinished_answer_drops_the_connection())


async def _closing_an_unfinished_answer_drops_the_connection() -> None:
    aborted = asyncio.Event()

    async def endless(conn: int, n: int, w: asyncio.StreamWriter) -> None:
        if conn > 1:
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            return
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        try:
            for _ in range(500):
                w.write(b"2\r\nhi\r\n")
                await w.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            aborted.set()
            raise

    async with Scripted(endless) as srv:
        p = pool()
        resp = await post(p, srv.url)
        assert await resp.first_chunk()
        await resp.aclose()  # the replica learns to abort: its connection ends
        await asyncio.wait_for(aborted.wait(), 5)
        assert await (await post(p, srv.url)).aread() == b"ok"
        assert srv.connections == 2  # never reused
        await p.close()


def test_an_informational_answer_is_skipped(run) -> None:
    run(_an_informational_answer_is_skipped())


async def _an_informational_answer_is_skipped() -> None:
    def answer(conn: int, n: int, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    async with Scripted(answer) as srv:
        p = pool()
        resp = await post(p, srv.url)
        assert resp.status_code == 200 and await resp.aread() == b"ok"
        await p.close()


def test_metrics_line_scan_reads_only_its_families_with_labels_and_timestamps() -> None:
    text = (
        "# HELP vllm:num_requests_running x\n"
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{model_name="a \\"quoted\\", engine=\\"1\\"",engine="0"} 2 1700000000000\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 3\n'
        "vllm:num_requests_running_other 100\n"
        "vllm:num_requests_waiting 4\n"  # no labels: every rank counts it
        'vllm:kv_cache_usage_perc{engine="0"} 0.25\n'
        'vllm:kv_cache_usage_perc{engine="1"} 0.5\n'
        'vllm:prefix_cache_hits_total{engine="0"} 9\n'
    )
    assert parse_vllm_metrics(text) == (5.0, 4.0, 0.5)
    assert parse_vllm_metrics(text, 0) == (2.0, 4.0, 0.25)
    assert parse_vllm_metrics(text, 1) == (3.0, 4.0, 0.5)
    with pytest.raises(ValueError):
        parse_vllm_metrics("vllm:num_requests_waiting{engine=0} 1\n")


def test_the_probe_client_answers_like_httpx_for_what_the_fleet_reads(run) -> None:
    run(_the_probe_client_answers_like_httpx_for_what_the_fleet_reads())


async def _the_probe_client_answers_like_httpx_for_what_the_fleet_reads() -> None:
    async def answer(conn: int, n: int, w: asyncio.StreamWriter) -> None:
        if n == 3:
            await asyncio.sleep(2)  # too slow for the caller's timeout
            return
        body = b'{"data": [{"id": "m"}]}' if n == 1 else b"vllm:num_requests_running 2\n"
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))

    client = ProbeClient(LimitsConfig(upstream_keepalive_s=4.0))
    async with Scripted(answer) as srv:
        r = await client.get(srv.url + "/v1/models", headers={"authorization": "Bearer k"}, timeout=1.0)
        assert r.status_code == 200 and r.json() == {"data": [{"id": "m"}]}
        assert "authorization: Bearer k\r\n" in srv.heads[0].decode() and srv.heads[0].startswith(b"GET /v1/models HTTP/1.1\r\n")
        r = await client.get(srv.url + "/metrics", timeout=1.0)
        assert parse_vllm_metrics(r.text) == (2.0, 0.0, 0.0)
        assert srv.connections == 1  # kept alive between probes
        with pytest.raises(httpx.ReadTimeout):
            await client.get(srv.url + "/metrics", timeout=0.2)
        url = srv.url
    with pytest.raises(httpx.ConnectError):
        await client.get(url + "/metrics", timeout=1.0)
    await client.aclose()
