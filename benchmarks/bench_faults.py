"""Faults under load, as a repeatable benchmark: what clients see when parts of the stack die.

Everything runs as real processes on 127.0.0.1, started here and stopped here: three simulated
replicas (``python -m simulator.cli``, KV events and replay on), a ``redis-server`` in a temp
dir, ``kvgate indexer`` feeding Redis, and ``kvgate serve`` with ``index.backend: redis://``,
``index.ingest: false`` and client auth on. A bounded closed-loop load (``--sessions``
concurrent sessions over shared-prefix prompts, completions and chat, mostly streamed, through
httpx) runs from start to end, and the faults are injected one after another:

=================  ===========================================================================
replica-kill       SIGKILL the replica with the most streams in flight, restart it after the hold
replica-stop       SIGSTOP the busiest replica for the hold, then SIGCONT
replica-restart    SIGTERM the busiest replica (graceful), start it again at once on its ports
redis-kill         SIGKILL redis-server, restart it empty after the hold (the index is rebuilt)
indexer-kill       SIGKILL ``kvgate indexer``, restart it after the hold
junk-events        a fake publisher (an extra replica in the indexer's config, on a model the
                   load never asks for) sends malformed frames and msgpack for the hold, and its
                   replay endpoint answers junk
redis-stop         SIGSTOP redis-server for the hold (a hung Redis: connections open, no answers)
=================  ===========================================================================

If the index does not get over a fault by itself within ``--settle-max`` seconds (prefix hits
not back), the bench restarts the indexer (a fresh one replays
every replica's buffer) so the next fault starts from a sound index; that repair gets its own
row. Each fault owns a window: a few seconds before it (the baseline), the fault, and the time until
prefix hits are back and every replica is healthy in the gateway again. Every request started
in the window counts in its row: sent, served OK, failed by kind (HTTP 4xx / 5xx, a stream that
ended with an SSE error event, a connection error, a 200 stream that ended without ``[DONE]``
or an error), hung (no complete answer within ``--deadline``), and the streams that were in
flight on a killed replica ("cut", with how many of them got the SSE error event). "Lost" is
every failure that is not such a cut stream: the target is 0. "Hits back" is how long after
the fault the share of requests with a prefix hit is back at 80% of the window's baseline, for
the index (the gateway's ``x-kvgate-prefix-blocks`` debug header > 0: the Redis index found the
prefix on the chosen replica) and for the replicas' own cache (``cached_tokens`` > 0); 0 means
it never dropped below that.

Without ``redis-server`` the gateway runs its memory index with in-process ingestion, the junk
publisher goes into the gateway's config, and the Redis and indexer faults are skipped (said
so in the output).

    python -m benchmarks.bench_faults [--quick] [--faults replica-kill,redis-kill] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec

from simulator.config import SimConfig
from simulator.fleet import cli_args

MODEL = "kvgate/demo-8b"
JUNK_MODEL = "kvgate/junk"
CLIENT_KEY = "bench-client-key"
ROOT = Path(__file__).resolve().parents[1]
FAULTS = ["replica-kill", "replica-stop", "replica-restart", "redis-kill", "indexer-kill", "junk-events", "redis-stop"]
REDIS_FAULTS = {"redis-kill", "redis-stop", "indexer-kill"}
#: a prefix-hit signal is "back" at this share of the window's baseline
RECOVERED_SHARE = 0.8
#: hit shares are computed over buckets of this width (seconds), each needing a few requests
BUCKET_S = 0.5
MIN_BUCKET_REQUESTS = 3


# -- processes -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pdeathsig() -> list[str]:
    """Children die with this process even if it is SIGKILLed (``setpriv --pdeathsig``, Linux).
    The signal follows the *thread* that started the child: every child here is started from
    the main thread."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL"] if setpriv else []


class Proc:
    """One child process with its log file; every start/stop is from the main thread."""

    def __init__(self, name: str, argv: list[str], logdir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log = logdir / f"{name}.log"
        self.env = {**os.environ, "PYTHONHASHSEED": "0", **(env or {})}
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} is not running"
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        self.starts += 1
        with self.log.open("ab") as log:
            log.write(f"\n--- start #{self.starts} at {time.strftime('%H:%M:%S')} ---\n".encode())
            log.flush()
            self.popen = subprocess.Popen([*_pdeathsig(), *self.argv], cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.popen is not None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
            self.popen.wait()

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGCONT (it may be stopped), SIGTERM, wait; SIGKILL after ``timeout``. The exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGCONT)
                self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def log_summary(self) -> dict[str, int]:
        """Error and warning lines (JSON logs) and tracebacks in this process's log so far."""
        text = self.tail(50_000_000)
        return {
            "errors": text.count('"level": "error"') + text.count('"level": "critical"'),
            "warnings": text.count('"level": "warning"'),
            "tracebacks": text.count("Traceback (most recent call last)"),
        }

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def wait_until(ok: Callable[[], bool], timeout: float, what: str, proc: Proc | None = None, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.popen is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{what}: {proc.name} exited with {proc.popen.returncode}; its log ends with:\n{proc.tail()}")
        with contextlib.suppress(Exception):
            if ok():
                return
        time.sleep(step)
    tail = f"; {proc.name}'s log ends with:\n{proc.tail()}" if proc is not None else ""
    raise RuntimeError(f"{what}: not within {timeout:g} s{tail}")


def http_ok(url: str) -> bool:
    return httpx.get(url, timeout=1.0).status_code == 200


class Replica(Proc):
    """A simulated vLLM replica on fixed ports (a restart comes back on the same ones)."""

    def __init__(self, rid: str, cfg: SimConfig, logdir: Path) -> None:
        super().__init__(rid, [sys.executable, "-m", "simulator.cli", *cli_args(cfg)], logdir)
        self.rid = rid
        self.cfg = cfg
        self.url = f"http://127.0.0.1:{cfg.port}"
        self.events = f"tcp://127.0.0.1:{cfg.kv_events_port}"
        self.replay = f"tcp://127.0.0.1:{cfg.replay_port}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        wait_until(lambda: http_ok(self.url + "/health"), timeout, f"replica {self.rid}", self)


def make_replicas(n: int, logdir: Path, *, time_scale: float, num_blocks: int) -> list[Replica]:
    out = []
    for i in range(n):
        cfg = SimConfig(
            model=MODEL,
            port=free_port(),
            kv_events=True,
            kv_events_port=free_port(),
            replay_port=free_port(),
            seed=i,
            time_scale=time_scale,
            num_blocks=num_blocks,
            engine_id=f"bench-r{i}",
        )
        out.append(Replica(f"r{i}", cfg, logdir))
    return out


def start_all(replicas: list[Replica], attempts: int = 3) -> None:
    """Start the replicas side by side; one whose port was taken meanwhile moves to new ports."""
    for r in replicas:
        r.start()
    for r in replicas:
        for attempt in range(attempts):
            try:
                r.wait_ready()
                break
            except RuntimeError:
                r.stop()
                if attempt + 1 == attempts:
                    raise
                fresh = make_replicas(1, r.log.parent, time_scale=r.cfg.time_scale, num_blocks=r.cfg.num_blocks)[0]
                r.cfg, r.argv, r.url, r.events, r.replay = fresh.cfg, fresh.argv, fresh.url, fresh.events, fresh.replay
                r.start()


class Redis(Proc):
    """redis-server without persistence: a restart comes back empty, on the same port."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        super().__init__("redis", self._argv(binary), workdir)
        self.binary = binary

    def _argv(self, binary: str) -> list[str]:
        return [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory",
            "256mb",
            "--maxmemory-policy",
            "volatile-lru",
        ]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def start_ready(self, first: bool = False) -> None:
        for _ in range(5 if first else 1):
            self.start()
            try:
                wait_until(self.ping, 10, "redis-server", self)
                return
            except RuntimeError:
                self.stop()
                if not first:
                    raise
                self.port = free_port()  # taken by someone else before redis bound it
                self.argv = self._argv(self.binary)
        raise RuntimeError("redis-server did not start")

    def dbsize(self) -> int | None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"DBSIZE\r\n")
                reply = s.recv(64)
            return int(reply[1:].split(b"\r\n")[0]) if reply.startswith(b":") else None
        except (OSError, ValueError):
            return None


def gateway_config(replicas: list[Replica], port: int, *, index: str, ingest: bool, junk: JunkPublisher | None = None) -> dict[str, Any]:
    entries: list[dict[str, Any]] = [{"id": r.rid, "url": r.url, "models": [MODEL], "kv_events": r.events, "replay": r.replay} for r in replicas]
    if junk is not None:
        entries.append(junk.replica_entry())
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "replicas": entries,
        "models": {MODEL: {"tokenizer": "demo"}, JUNK_MODEL: {"tokenizer": "demo"}},
        "index": {"backend": index, "ingest": ingest},
        "auth": {"api_keys": [CLIENT_KEY]},
        # probes every second, a circuit reopened for probing after 2 s (defaults: 2 s and 5 s)
        # so each fault's window stays short; 3 failures still open a circuit
        "health": {"interval_s": 1.0, "timeout_s": 1.0, "failure_threshold": 3, "cooldown_s": 2.0},
        "scrape": {"interval_s": 0.5},
        "debug_headers": True,
    }


class Gateway(Proc):
    def __init__(self, cfg: dict[str, Any], logdir: Path, name: str = "gateway") -> None:
        self.port = int(cfg["listen"]["port"])
        self.cfg_path = logdir / f"{name}.yaml"
        self.cfg_path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
        super().__init__(name, [sys.executable, "-m", "gateway.cli", "serve", "--config", str(self.cfg_path)], logdir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        wait_until(lambda: http_ok(self.url + "/ready"), timeout, "gateway", self)

    def metrics(self) -> dict[str, float]:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=2.0).text)

    def all_healthy(self, rids: list[str]) -> bool:
        m = self.metrics()
        return all(m.get(f'kvgate_replica_healthy{{replica="{r}"}}') == 1.0 for r in rids)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {"name{labels}": value} (labels as written by prometheus_client)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


def metric_sum(m: dict[str, float], name: str) -> float:
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


class Indexer(Proc):
    def __init__(self, cfg: dict[str, Any], logdir: Path) -> None:
        path = logdir / "indexer.yaml"
        path.write_text(json.dumps(cfg, indent=1))
        super().__init__("indexer", [sys.executable, "-m", "gateway.cli", "indexer", "--config", str(path), "--stats-every", "5"], logdir)


# -- junk KV events --------------------------------------------------------------------------------


def _seq(n: int) -> bytes:
    return (n % 2**64).to_bytes(8, "big")


def junk_messages(rng: random.Random, start_seq: int) -> Iterator[list[bytes]]:
    """Malformed KV-event messages, round after round: wrong frame counts, bad seqs, bytes
    that are not msgpack, msgpack of the wrong shape, events with wrong field types, absurd
    block sizes, seq jumps and seq resets, deep nesting, a length header promising 4 GiB."""
    enc = msgspec.msgpack.encode
    seq = start_seq
    stored = {
        "type": "BlockStored",
        "block_hashes": [rng.getrandbits(63)],
        "parent_block_hash": None,
        "token_ids": list(range(16)),
        "block_size": 16,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }
    while True:
        seq += 1
        now = time.time()
        yield from (
            [b"one frame only"],
            [b"", _seq(seq), b"x", b"a fourth frame"],
            [b"", b"\x00\x01", enc([now, [], 0])],  # a 2-byte seq
            [b"", _seq(seq), rng.randbytes(rng.randint(1, 300))],
            [b"", _seq(seq + 1), b"\xc1"],  # the one byte msgpack never uses
            [b"", _seq(seq + 2), enc("not a batch")],
            [b"", _seq(seq + 3), enc([now, "events?", 0])],
            [b"", _seq(seq + 4), enc([now, [{"type": "BlockStored", "block_hashes": "nope", "token_ids": [1, 2]}], 0])],
            [b"", _seq(seq + 5), enc([now, [["BlockStored", None, None]], 0])],
            [b"", _seq(seq + 6), enc([now, [{**stored, "block_size": 0}], 0])],
            [b"", _seq(seq + 7), enc([now, [{**stored, "block_size": -16, "token_ids": ["a"] * 16}], 0])],
            [b"", _seq(seq + 8), enc([now, [{**stored, "block_hashes": [-1, 2**64 - 1], "medium": 7}], 0])],
            [b"", _seq(seq + 9), enc([now, [{"type": "BlockRemoved", "block_hashes": None}], 0])],
            [b"", _seq(seq + 10), enc([now, [{"type": "NoSuchEvent", "x": 1}, 42, None], 0])],
            [b"", _seq(seq + 11), b"\x93" * 5000 + b"\xc0"],  # 5000 nested arrays
            [b"", _seq(seq + 12), b"\xdd\xff\xff\xff\xff"],  # an array of 4G elements, none sent
            [b"", _seq(2**63 + seq), enc([now, [stored], 0])],  # a wild seq jump
            [b"", _seq(0), enc([now, [stored], 0])],  # "restarted"
        )
        seq += 13


class JunkPublisher:
    """A fake replica's KV-event PUB socket and replay ROUTER, both answering junk."""

    def __init__(self, seed: int = 7) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub_port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router_port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.http_port = free_port()  # nothing listens there: the fake replica is never healthy
        self.rng = random.Random(seed)
        self.sent = 0
        self.replays = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve_replay, name="junk-replay", daemon=True)
        self._thread.start()
        self._messages = junk_messages(self.rng, 0)

    def replica_entry(self) -> dict[str, Any]:
        return {
            "id": "junk",
            "url": f"http://127.0.0.1:{self.http_port}",
            "models": [JUNK_MODEL],
            "kv_events": f"tcp://127.0.0.1:{self.pub_port}",
            "replay": f"tcp://127.0.0.1:{self.router_port}",
        }

    def burst(self, seconds: float, per_s: float = 200.0) -> None:
        """Send junk for ``seconds`` (from the main thread: the PUB socket is only used there)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.pub.send_multipart(next(self._messages))
            self.sent += 1
            time.sleep(1.0 / per_s)

    def _serve_replay(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        while not self._stop.is_set():
            if not dict(poller.poll(100)):
                continue
            frames = self.router.recv_multipart()
            self.replays += 1
            ident = frames[0]
            for junk in ([b"", b"topic", _seq(1), b"\xc1"], [b"", b"garbage"], [b"", b"", b"\x01\x02", b""], [b"", b"", _seq(2), b"\x93\x01"]):
                self.router.send_multipart([ident, *junk])
            self.router.send_multipart([ident, b"", b"", b"\xff" * 8, b""])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.pub.close(0)
        self.router.close(0)
        self.ctx.term()


# -- the load ----------------------------------------------------------------------------------------

_SYLL = "ka ri to ne mu sa lo pe di va gu shi an el or ix um et qua zen bro fil mar cor tin".split()


def words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(_SYLL) for _ in range(rng.randint(1, 3))) for _ in range(n))


@dataclass
class Record:
    """One request as the client saw it (times: time.monotonic())."""

    t0: float
    kind: str  # completions | chat
    stream: bool
    t_headers: float | None = None
    t1: float | None = None
    status: int | None = None
    outcome: str = "pending"  # ok | http_4xx | http_5xx | sse_error | conn_error | truncated | hung | (soak) disconnected
    replica: str | None = None
    prefix_blocks: int | None = None
    cached_tokens: int | None = None
    chunks: int = 0
    error: str | None = None


class Load:
    """Closed-loop sessions on their own thread and event loop, recording every request."""

    def __init__(self, base: str, *, sessions: int, deadline_s: float, seed: int = 1, groups: int = 8, think_s: float = 0.02) -> None:
        self.base = base
        self.sessions = sessions
        self.deadline_s = deadline_s
        self.seed = seed
        self.think_s = think_s
        rng = random.Random(seed)
        self.systems = [f"[team {g}] You are a support assistant. Policy: " + words(rng, 140) for g in range(groups)]
        self.records: list[Record] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Let every session finish its request in hand (each bounded by the deadline)."""
        self._stop.set()
        self._thread.join(self.deadline_s + 30)

    def snapshot(self) -> list[Record]:
        return list(self.records)

    def _run(self) -> None:
        import asyncio

        asyncio.run(self._main())

    async def _main(self) -> None:
        import asyncio

        limits = httpx.Limits(max_connections=self.sessions * 2, max_keepalive_connections=self.sessions)
        async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits, headers={"authorization": f"Bearer {CLIENT_KEY}"}) as client:
            await asyncio.gather(*(self._session(client, i) for i in range(self.sessions)))

    async def _session(self, client: httpx.AsyncClient, i: int) -> None:
        import asyncio

        rng = random.Random(self.seed * 1000 + i)
        await asyncio.sleep(i * 0.03)  # ramp in
        while not self._stop.is_set():
            stream = rng.random() < 0.75
            chat = rng.random() < 0.5
            system = rng.choice(self.systems)
            question = words(rng, 12)
            out = 40 if stream else 12
            if chat:
                body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
            else:
                body = {"model": MODEL, "prompt": f"{system}\n\nQuestion: {question}\nAnswer:"}
            body["max_tokens"] = out
            if stream:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
            rec = Record(time.monotonic(), "chat" if chat else "completions", stream)
            self.records.append(rec)
            try:
                async with asyncio.timeout(self.deadline_s):
                    await self.send(client, rec, body)
            except TimeoutError:
                rec.outcome, rec.error = "hung", f"no complete answer within {self.deadline_s:g} s"
            rec.t1 = time.monotonic()
            await asyncio.sleep(self.think_s * rng.random() * 2)

    async def send(self, client: httpx.AsyncClient, rec: Record, body: dict[str, Any], *, read_chunks: int | None = None, headers: dict | None = None) -> None:
        """One request; sets ``rec``'s outcome. ``read_chunks``: leave after that many chunks."""
        path = "/v1/chat/completions" if rec.kind == "chat" else "/v1/completions"
        try:
            if not rec.stream:
                r = await client.post(self.base + path, json=body, headers=headers)
                self._headers(rec, r)
                if r.status_code != 200:
                    rec.outcome, rec.error = _status_outcome(r.status_code), _error_code(r.content)
                    return
                data = msgspec.json.decode(r.content)
                rec.cached_tokens = _cached(data)
                rec.outcome = "ok" if isinstance(data, dict) and data.get("choices") else "truncated"
                return
            async with client.stream("POST", self.base + path, json=body, headers=headers) as r:
                self._headers(rec, r)
                if r.status_code != 200:
                    await r.aread()
                    rec.outcome, rec.error = _status_outcome(r.status_code), _error_code(r.content)
                    return
                done = False
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    payload = line[6:]
                    if payload == "[DONE]":
                        done = True
                        continue
                    event = msgspec.json.decode(payload)
                    if isinstance(event, dict) and "error" in event:
                        rec.outcome, rec.error = "sse_error", _error_code(payload.encode())
                        continue
                    rec.chunks += 1
                    if isinstance(event, dict) and event.get("usage"):
                        rec.cached_tokens = _cached(event)
                    if read_chunks is not None and rec.chunks >= read_chunks:
                        rec.outcome = "disconnected"
                        return  # leaving the block closes the connection mid-stream
                if rec.outcome == "pending":
                    rec.outcome = "ok" if done else "truncated"
        except httpx.TransportError as exc:
            rec.outcome, rec.error = "conn_error", f"{type(exc).__name__}: {exc}"[:200]
        except msgspec.DecodeError as exc:
            rec.outcome, rec.error = "truncated", f"undecodable: {exc}"[:200]

    @staticmethod
    def _headers(rec: Record, r: httpx.Response) -> None:
        rec.t_headers = time.monotonic()
        rec.status = r.status_code
        rec.replica = r.headers.get("x-kvgate-replica")
        pb = r.headers.get("x-kvgate-prefix-blocks")
        rec.prefix_blocks = int(pb) if pb and pb.isdigit() else None


def _status_outcome(status: int) -> str:
    return "http_4xx" if 400 <= status < 500 else "http_5xx" if status >= 500 else f"http_{status}"


def _error_code(content: bytes) -> str:
    try:
        err = msgspec.json.decode(content).get("error")
        return str(err.get("code") or err.get("type") or err.get("message"))[:80] if isinstance(err, dict) else str(err)[:80]
    except Exception:
        return content[:80].decode(errors="replace")


def _cached(data: Any) -> int | None:
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0


# -- measuring -------------------------------------------------------------------------------------


def hit_share(records: list[Record], signal_name: str) -> float | None:
    """Share of answered requests with a prefix hit: ``index`` (prefix blocks > 0) or ``cache``
    (cached tokens > 0); None when none of them carries the signal."""
    vals = [getattr(r, "prefix_blocks" if signal_name == "index" else "cached_tokens") for r in records]
    vals = [v for v in vals if v is not None]
    return sum(1 for v in vals if v > 0) / len(vals) if vals else None


def hits_back_after(records: list[Record], t_fault: float, t_end: float, baseline: float | None, signal_name: str) -> float | None:
    """Seconds from the fault until the hit share stays at ``RECOVERED_SHARE`` of the baseline:
    the end of the last bucket (started at or after the fault, with enough requests) below it.
    0: it never dropped; None: no baseline to compare with."""
    if baseline is None or baseline < 0.2:
        return None
    threshold = RECOVERED_SHARE * baseline
    last_bad = -1
    k = 0
    while t_fault + k * BUCKET_S < t_end:
        lo, hi = t_fault + k * BUCKET_S, t_fault + (k + 1) * BUCKET_S
        bucket = [r for r in records if lo <= r.t0 < hi]
        share = hit_share(bucket, signal_name)
        n = sum(1 for r in bucket if getattr(r, "prefix_blocks" if signal_name == "index" else "cached_tokens") is not None)
        if share is not None and n >= MIN_BUCKET_REQUESTS and share < threshold:
            last_bad = k
        k += 1
    return (last_bad + 1) * BUCKET_S


def share_at_end(records: list[Record], t_end: float, span: float, signal_name: str) -> float | None:
    """The hit share of the requests started in the last ``span`` seconds before ``t_end``."""
    return hit_share([r for r in records if t_end - span <= r.t0 < t_end], signal_name)


def recovered_now(records: list[Record], t_fault: float, now: float, baseline: float | None, stable_s: float) -> bool:
    """Online: the index hit share of the last ``stable_s`` seconds of requests (whose headers
    are in) is back at the threshold."""
    if baseline is None or baseline < 0.2:
        return True
    lo, hi = max(t_fault, now - 1.0 - stable_s), now - 1.0
    window = [r for r in records if lo <= r.t0 < hi and r.prefix_blocks is not None]
    if hi - lo < stable_s * 0.99 or len(window) < MIN_BUCKET_REQUESTS:
        return False
    share = hit_share(window, "index")
    return share is not None and share >= RECOVERED_SHARE * baseline


@dataclass
class Window:
    name: str
    start: float
    fault_at: float | None = None
    recover_at: float | None = None  # restart / SIGCONT / end of the junk
    end: float = 0.0
    victim: str | None = None
    victim_streams: int = 0  # streams with their first chunk on the victim at the fault
    baseline_span: tuple[float, float] | None = None  # default: the pre_s seconds before the fault
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    fault: str
    sent: int
    ok: int
    http_4xx: int
    http_5xx: int
    sse_error: int
    conn_error: int
    truncated: int
    hung: int
    cut_on_killed: int
    cut_with_sse_error: int
    lost: int
    index_hits_back_s: float | None
    cache_hits_back_s: float | None
    slowest_ok_s: float | None
    baseline_index_hit: float | None
    baseline_cache_hit: float | None
    end_index_hit: float | None  # over the window's last seconds
    end_cache_hit: float | None
    index_still_down: bool  # the index hit share was still under the threshold when the window ended
    cache_still_down: bool
    victim: str | None
    hold_s: float | None
    notes: str
    errors: dict[str, int]
    lost_examples: list[dict[str, Any]]


def summarize(w: Window, records: list[Record], pre_s: float, end_span: float = 2.0) -> Row:
    mine = [r for r in records if w.start <= r.t0 < w.end]
    count = {k: sum(1 for r in mine if r.outcome == k) for k in ("ok", "http_4xx", "http_5xx", "sse_error", "conn_error", "truncated", "hung")}
    cut: list[Record] = []
    if w.name.startswith("replica-kill") and w.fault_at is not None:
        # streams that were being answered by the replica when it died: nothing can save them
        cut = [r for r in mine if r.outcome != "ok" and r.replica == w.victim and r.t_headers is not None and r.t_headers <= w.fault_at <= (r.t1 or w.end)]
    lost = [r for r in mine if r.outcome != "ok" and r not in cut]
    errors: dict[str, int] = {}
    for r in lost + cut:
        key = f"{r.outcome}:{r.error}"
        errors[key] = errors.get(key, 0) + 1
    base_idx = base_cache = None
    idx_back = cache_back = None
    if w.fault_at is not None:
        lo, hi = w.baseline_span or (w.fault_at - pre_s, w.fault_at)
        pre = [r for r in records if lo <= r.t0 < hi]
        base_idx, base_cache = hit_share(pre, "index"), hit_share(pre, "cache")
        idx_back = hits_back_after(mine, w.fault_at, w.end, base_idx, "index")
        cache_back = hits_back_after(mine, w.fault_at, w.end, base_cache, "cache")
    end_idx, end_cache = share_at_end(mine, w.end, end_span, "index"), share_at_end(mine, w.end, end_span, "cache")

    def down(base: float | None, end: float | None) -> bool:
        return base is not None and base >= 0.2 and end is not None and end < RECOVERED_SHARE * base

    return Row(
        fault=w.name,
        sent=len(mine),
        **count,
        cut_on_killed=len(cut),
        cut_with_sse_error=sum(1 for r in cut if r.outcome == "sse_error"),
        lost=len(lost),
        index_hits_back_s=idx_back,
        cache_hits_back_s=cache_back,
        slowest_ok_s=round(max(oks), 2) if (oks := [r.t1 - r.t0 for r in mine if r.outcome == "ok" and r.t1 is not None]) else None,
        baseline_index_hit=base_idx,
        baseline_cache_hit=base_cache,
        end_index_hit=end_idx,
        end_cache_hit=end_cache,
        index_still_down=w.fault_at is not None and down(base_idx, end_idx),
        cache_still_down=w.fault_at is not None and down(base_cache, end_cache),
        victim=w.victim,
        hold_s=round(w.recover_at - w.fault_at, 2) if w.recover_at and w.fault_at else None,
        notes="; ".join(w.notes),
        errors=errors,
        lost_examples=[{k: v for k, v in asdict(r).items() if k in ("kind", "stream", "status", "outcome", "replica", "chunks", "error")} for r in lost[:5]],
    )


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class Timing:
    sessions: int
    warmup_s: float
    pre_s: float
    hold_s: float
    stable_s: float
    max_post_s: float
    deadline_s: float
    rounds: int


QUICK = Timing(sessions=8, warmup_s=3.0, pre_s=1.5, hold_s=1.5, stable_s=1.0, max_post_s=8.0, deadline_s=20.0, rounds=1)
FULL = Timing(sessions=16, warmup_s=8.0, pre_s=4.0, hold_s=5.0, stable_s=3.0, max_post_s=30.0, deadline_s=30.0, rounds=2)


class Stack:
    def __init__(self, logdir: Path, *, use_redis: bool, time_scale: float, num_blocks: int) -> None:
        self.logdir = logdir
        self.replicas = make_replicas(3, logdir, time_scale=time_scale, num_blocks=num_blocks)
        self.junk = JunkPublisher()
        self.redis: Redis | None = None
        self.indexer: Indexer | None = None
        binary = shutil.which("redis-server") if use_redis else None
        if binary:
            self.redis = Redis(binary, logdir)
        gw_port = free_port()
        if self.redis is not None:
            cfg = gateway_config(self.replicas, gw_port, index=self.redis.url, ingest=False)
            self.indexer = Indexer(gateway_config(self.replicas, gw_port, index=self.redis.url, ingest=True, junk=self.junk), logdir)
        else:
            cfg = gateway_config(self.replicas, gw_port, index="memory", ingest=True, junk=self.junk)
        self.gateway = Gateway(cfg, logdir)

    def start(self) -> None:
        if self.redis is not None:
            self.redis.start_ready(first=True)
        start_all(self.replicas)
        if self.indexer is not None:
            self.indexer.start()
        for attempt in range(3):
            self.gateway.start()
            try:
                self.gateway.wait_ready()
                break
            except RuntimeError:
                self.gateway.stop()
                if attempt == 2:
                    raise
                cfg = json.loads(self.gateway.cfg_path.read_text())
                cfg["listen"]["port"] = free_port()
                self.gateway = Gateway(cfg, self.logdir)
        wait_until(lambda: self.gateway.all_healthy(self.rids), 30, "replicas healthy in the gateway", self.gateway)
        if self.indexer is not None and not self.indexer.alive():
            raise RuntimeError(f"kvgate indexer exited:\n{self.indexer.tail()}")

    @property
    def rids(self) -> list[str]:
        return [r.rid for r in self.replicas]

    def replica(self, rid: str) -> Replica:
        return next(r for r in self.replicas if r.rid == rid)

    def stop(self) -> tuple[dict[str, int | None], dict[str, dict[str, int]]]:
        """Stop everything; exit codes and log summaries by process."""
        codes: dict[str, int | None] = {}
        logs: dict[str, dict[str, int]] = {}
        for p in [self.gateway, self.indexer, *self.replicas, self.redis]:
            if p is not None:
                codes[p.name] = p.stop()
                if p is not self.redis:
                    logs[p.name] = p.log_summary()
        self.junk.close()
        return codes, logs


def busiest(records: list[Record], rids: list[str]) -> tuple[str, int]:
    """The replica answering the most streams right now (first chunk in, not finished)."""
    counts = dict.fromkeys(rids, 0)
    for r in records:
        if r.t1 is None and r.stream and r.chunks > 0 and r.replica in counts:
            counts[r.replica] += 1
    rid = max(rids, key=lambda k: counts[k])
    return rid, counts[rid]


def inject(name: str, stack: Stack, load: Load, w: Window, hold_s: float) -> None:
    """Carry out one fault (blocking, on the main thread) and fill ``w``'s times and notes."""
    w.fault_at = time.monotonic()
    m0 = stack.gateway.metrics()
    if name.startswith("replica-"):
        # strike while a replica is answering streams (bounded wait: the load is closed-loop)
        until = time.monotonic() + 3.0
        w.victim, w.victim_streams = busiest(load.snapshot(), stack.rids)
        while w.victim_streams < 2 and time.monotonic() < until:
            time.sleep(0.02)
            w.victim, w.victim_streams = busiest(load.snapshot(), stack.rids)
        rep = stack.replica(w.victim)
        w.fault_at = time.monotonic()
        if name.startswith("replica-kill"):
            rep.signal(signal.SIGKILL)
            rep.kill()
            time.sleep(hold_s)
            w.recover_at = time.monotonic()
            rep.start()
            rep.wait_ready()
            w.notes.append(f"{w.victim} SIGKILLed with {w.victim_streams} streams mid-way; back after {time.monotonic() - w.fault_at:.1f} s")
        elif name.startswith("replica-stop"):
            rep.signal(signal.SIGSTOP)
            time.sleep(hold_s)
            rep.signal(signal.SIGCONT)
            w.recover_at = time.monotonic()
            w.notes.append(f"{w.victim} stopped {hold_s:g} s with {w.victim_streams} streams mid-way")
        else:
            code = rep.stop(timeout=60)
            t_down = time.monotonic()
            rep.start()
            rep.wait_ready()
            w.recover_at = time.monotonic()
            w.notes.append(
                f"{w.victim} SIGTERM with {w.victim_streams} streams mid-way: exited {code} after {t_down - w.fault_at:.1f} s, serving again after {w.recover_at - w.fault_at:.1f} s"
            )
    elif name.startswith("redis-kill"):
        assert stack.redis is not None
        keys = stack.redis.dbsize()
        stack.redis.kill()
        time.sleep(hold_s)
        w.recover_at = time.monotonic()
        stack.redis.start_ready()
        w.notes.append(f"Redis ({keys} keys) SIGKILLed, restarted empty after {hold_s:g} s")
    elif name.startswith("redis-stop"):
        assert stack.redis is not None
        stack.redis.signal(signal.SIGSTOP)
        time.sleep(hold_s)
        stack.redis.signal(signal.SIGCONT)
        w.recover_at = time.monotonic()
        w.notes.append(f"Redis stopped {hold_s:g} s")
    elif name.startswith("indexer-kill"):
        assert stack.indexer is not None
        stack.indexer.kill()
        time.sleep(hold_s)
        w.recover_at = time.monotonic()
        stack.indexer.start()
        w.notes.append(f"indexer SIGKILLed, restarted after {hold_s:g} s")
    elif name.startswith("junk-events"):
        keys0 = stack.redis.dbsize() if stack.redis is not None else None
        sent0, replays0 = stack.junk.sent, stack.junk.replays
        stack.junk.burst(hold_s)
        w.recover_at = time.monotonic()
        time.sleep(1.0)
        who = stack.indexer if stack.indexer is not None else stack.gateway
        alive = who.alive()
        note = f"{stack.junk.sent - sent0} junk messages, {stack.junk.replays - replays0} junk replays; {who.name} {'alive' if alive else 'DEAD'}"
        if stack.redis is not None:
            note += f"; Redis keys {keys0} → {stack.redis.dbsize()}"
        w.notes.append(note)
        w.extra["consumer_alive"] = alive
    else:
        raise ValueError(name)
    with contextlib.suppress(Exception):
        m1 = stack.gateway.metrics()
        for metric in ("kvgate_retries_total", "kvgate_midstream_failures_total", "kvgate_index_errors_total"):
            w.extra[metric] = metric_sum(m1, metric) - metric_sum(m0, metric)


def settle(stack: Stack, load: Load, w: Window, t: Timing) -> str | None:
    """Wait for prefix hits to be back and every replica healthy in the gateway (bounded).
    None when both are, else what was still wrong: "hits" (the index hit share is not back;
    worth a repair) or "health"."""
    assert w.fault_at is not None
    lo, hi = w.baseline_span or (w.fault_at - t.pre_s, w.fault_at)
    baseline = hit_share([r for r in load.snapshot() if lo <= r.t0 < hi], "index")
    start = w.recover_at or w.fault_at
    deadline = start + t.max_post_s
    time.sleep(t.stable_s)
    unhealthy: list[str] = []
    hits_back = False
    while time.monotonic() < deadline:
        unhealthy = list(stack.rids)
        with contextlib.suppress(Exception):
            m = stack.gateway.metrics()
            unhealthy = [r for r in stack.rids if m.get(f'kvgate_replica_healthy{{replica="{r}"}}') != 1.0]
        hits_back = recovered_now(load.snapshot(), w.fault_at, time.monotonic(), baseline, t.stable_s)
        if not unhealthy and hits_back:
            return None
        time.sleep(0.25)
    why = [] if hits_back else ["prefix hits not back"]
    if unhealthy:
        why.append(f"unhealthy in the gateway: {', '.join(unhealthy)}")
    w.notes.append(f"not settled {t.max_post_s:g} s after recovery ({'; '.join(why)})")
    return "health" if hits_back else "hits"


def repair(stack: Stack, load: Load, w: Window, t: Timing) -> bool:
    """After a fault the stack did not get over by itself: restart the indexer (a fresh one
    replays every replica's buffer from seq 0), so the next fault starts from a sound index."""
    if stack.indexer is None:
        return False
    w.fault_at = time.monotonic()
    stack.indexer.stop()
    stack.indexer.start()
    w.recover_at = time.monotonic()
    w.notes.append("the bench restarted the indexer so that the next fault starts from a sound index")
    return True


def after_load(stack: Stack) -> dict[str, Any]:
    """Once the load is over: what the gateway and the replicas still count in flight."""
    time.sleep(1.5)  # a scrape interval or two
    out: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        m = stack.gateway.metrics()
        out["gateway_inflight"] = m.get("kvgate_inflight_requests")
        out["gateway_replica_inflight"] = metric_sum(m, "kvgate_replica_inflight_requests")
        out["admission_waiting"] = m.get("kvgate_admission_waiting")
    running = 0.0
    for r in stack.replicas:
        with contextlib.suppress(Exception):
            rm = parse_metrics(httpx.get(r.url + "/metrics", timeout=2).text)
            running += metric_sum(rm, "vllm:num_requests_running") + metric_sum(rm, "vllm:num_requests_waiting")
    out["replicas_running_or_waiting"] = running
    return out


def run(faults: list[str], t: Timing, *, logdir: Path, use_redis: bool, seed: int, console) -> dict[str, Any]:
    stack = Stack(logdir, use_redis=use_redis, time_scale=1.0, num_blocks=2048)
    skipped: list[str] = []
    reason = ""
    if stack.redis is None:
        skipped = [f for f in faults if f in REDIS_FAULTS]
        faults = [f for f in faults if f not in REDIS_FAULTS]
        reason = ("redis-server is not installed" if use_redis else "--no-redis") + " (the gateway runs its memory index and ingests KV events itself)"
        if skipped:
            console.print(f"[yellow]skipping {', '.join(skipped)}: {reason}[/]")
    t_begin = time.monotonic()
    windows: list[Window] = []
    load: Load | None = None
    exit_codes: dict[str, int | None] = {}
    logs: dict[str, dict[str, int]] = {}
    after: dict[str, Any] = {}
    try:
        stack.start()
        console.print(f"stack up in {time.monotonic() - t_begin:.1f} s (logs: {logdir})")
        load = Load(stack.gateway.url, sessions=t.sessions, deadline_s=t.deadline_s, seed=seed)
        load.start()
        w = Window("(warm-up, no fault)", time.monotonic())
        windows.append(w)
        time.sleep(t.warmup_s)
        for rnd in range(t.rounds):
            for name in faults:
                label = name if t.rounds == 1 else f"{name} #{rnd + 1}"
                w.end = time.monotonic()
                w = Window(label, w.end)
                windows.append(w)
                console.print(f"[bold]{label}[/] ...")
                time.sleep(t.pre_s)
                inject(name, stack, load, w, t.hold_s)
                if settle(stack, load, w, t) == "hits":
                    w.end = time.monotonic()
                    fixed = Window(f"(repair after {label})", w.end, baseline_span=(w.fault_at - t.pre_s, w.fault_at) if w.fault_at else None)
                    if repair(stack, load, fixed, t):
                        windows.append(fixed)
                        settle(stack, load, fixed, t)
                        w = fixed
        w.end = time.monotonic()
        load.stop()
        after = after_load(stack)
    finally:
        if load is not None:
            load.stop()
        exit_codes, logs = stack.stop()
    records = load.snapshot() if load is not None else []
    rows = [summarize(w, records, t.pre_s, t.stable_s) for w in windows]
    for w, row in zip(windows, rows, strict=True):
        row.notes = "; ".join(w.notes)
    return {
        "rows": [asdict(r) for r in rows],
        "windows": [{**asdict(w), "start": w.start - t_begin, "end": w.end - t_begin} for w in windows],
        "skipped": skipped,
        "skip_reason": reason,
        "after_load": after,
        "exit_codes": exit_codes,
        "logs": logs,
        "wall_s": round(time.monotonic() - t_begin, 1),
        "redis": stack.redis is not None,
    }


def _fmt_s(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def _fmt_back(v: float | None, still_down: bool) -> str:
    return f"[red]never (>{v:.0f})[/]" if still_down and v is not None else _fmt_s(v)


def print_table(result: dict[str, Any], console) -> None:
    from rich.table import Table

    table = Table(title="faults under load", show_lines=False)
    cols = ["fault", "sent", "ok", "4xx", "5xx", "SSE err", "conn err", "trunc.", "hung", "cut (SSE)", "lost", "idx back s", "cache back s", "slowest s"]
    for c in cols:
        table.add_column(c, justify="left" if c == "fault" else "right")
    for r in result["rows"]:
        table.add_row(
            r["fault"],
            str(r["sent"]),
            str(r["ok"]),
            str(r["http_4xx"]),
            str(r["http_5xx"]),
            str(r["sse_error"]),
            str(r["conn_error"]),
            str(r["truncated"]),
            str(r["hung"]),
            f"{r['cut_on_killed']} ({r['cut_with_sse_error']})",
            ("[red]" if r["lost"] else "") + str(r["lost"]),
            _fmt_back(r["index_hits_back_s"], r["index_still_down"]),
            _fmt_back(r["cache_hits_back_s"], r["cache_still_down"]),
            _fmt_s(r["slowest_ok_s"]),
        )
    console.print(table)
    for r in result["rows"]:
        notes = r["notes"]
        if r["index_still_down"] or r["cache_still_down"]:
            shares = f"prefix-hit share index {_pct(r['baseline_index_hit'])} → {_pct(r['end_index_hit'])}, cache {_pct(r['baseline_cache_hit'])} → {_pct(r['end_cache_hit'])} (before → at the end)"
            notes = f"{notes}; {shares}" if notes else shares
        if notes:
            console.print(f"  {r['fault']}: {notes}")
        for ex in r["lost_examples"]:
            console.print(f"  [red]{r['fault']} lost:[/] {ex}")
    a = result["after_load"]
    if a:
        console.print(
            f"after the load: gateway in flight {a.get('gateway_inflight')}, per-replica in flight (sum) {a.get('gateway_replica_inflight')}, "
            f"replicas running or waiting {a.get('replicas_running_or_waiting')}"
        )
    if result["skipped"]:
        console.print(f"[yellow]skipped {', '.join(result['skipped'])}: {result['skip_reason']}[/]")
    console.print(
        "cut (SSE): streams the killed replica was answering (of them, ended by an SSE error event); lost: every other failure; "
        "idx/cache back: seconds from the fault until the share of requests with a prefix hit (index / replica cache) stays at "
        f"{RECOVERED_SHARE:.0%} of the baseline (0: never below); slowest: the slowest request served OK"
    )
    console.print(f"exit codes at the end (-15: SIGTERM re-raised by uvicorn after its graceful shutdown): {result['exit_codes']}")
    console.print(f"log lines (error / warning / traceback): {_log_line(result['logs'])}; wall {result['wall_s']} s")


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def _log_line(logs: dict[str, dict[str, int]]) -> str:
    return ", ".join(f"{name} {c['errors']}/{c['warnings']}/{c['tracebacks']}" for name, c in logs.items())


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_faults", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short holds, 8 sessions, one round: under a minute")
    ap.add_argument("--faults", help="comma-separated subset of: " + ", ".join(FAULTS))
    ap.add_argument("--sessions", type=int, help="concurrent client sessions (quick 8, full 16)")
    ap.add_argument("--hold", type=float, help="seconds a fault lasts (quick 1.5, full 5)")
    ap.add_argument("--rounds", type=int, help="times through the fault list (quick 1, full 2)")
    ap.add_argument("--deadline", type=float, help="a request without a complete answer by then is hung (quick 20 s, full 30 s)")
    ap.add_argument("--settle-max", type=float, help="longest wait after a fault for prefix hits and health to come back (quick 8 s, full 30 s)")
    ap.add_argument("--no-redis", action="store_true", help="memory index only, as if redis-server were missing")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--logs", type=Path, help="keep the processes' logs and configs here (default: a temp dir, removed)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    faults = args.faults.split(",") if args.faults else list(FAULTS)
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        ap.error(f"unknown faults {unknown}; choose from {FAULTS}")
    base = QUICK if args.quick else FULL
    t = Timing(
        sessions=args.sessions or base.sessions,
        warmup_s=base.warmup_s,
        pre_s=base.pre_s,
        hold_s=args.hold if args.hold is not None else base.hold_s,
        stable_s=base.stable_s,
        max_post_s=args.settle_max if args.settle_max is not None else base.max_post_s,
        deadline_s=args.deadline or base.deadline_s,
        rounds=args.rounds or base.rounds,
    )
    console = Console(width=None if sys.stdout.isatty() else 200)
    stop_signals = _raise_on_signals()
    try:
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            result = run(faults, t, logdir=args.logs, use_redis=not args.no_redis, seed=args.seed, console=console)
        else:
            with tempfile.TemporaryDirectory(prefix="kvgate-faults-") as tmp:
                result = run(faults, t, logdir=Path(tmp), use_redis=not args.no_redis, seed=args.seed, console=console)
    finally:
        stop_signals()
    result["meta"] = {
        "command": "python -m benchmarks.bench_faults " + " ".join(argv if argv is not None else sys.argv[1:]),
        "timing": asdict(t),
        "machine": f"{os.cpu_count()} cores, load average at the end {os.getloadavg()[0]:.2f}",
        "stack": "3 simulated replicas (time scale 1, processes), redis-server, kvgate indexer, kvgate serve (redis index, ingest off, auth on)"
        if result["redis"]
        else "3 simulated replicas (time scale 1, processes), kvgate serve (memory index, auth on)",
    }
    print_table(result, console)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        console.print(f"wrote {args.json}")
    bad = sum(r["lost"] + r["hung"] for r in result["rows"])
    if bad:
        console.print(f"[red]{bad} requests lost or hung[/]")
    return 1 if bad else 0


def _raise_on_signals() -> Callable[[], None]:
    """SIGTERM/SIGHUP become SystemExit in the main thread, so the stack is always stopped."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)

    return restore


if __name__ == "__main__":
    sys.exit(main())
