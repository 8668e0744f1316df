"""Helpers shared by the simulator tests (no tests here): metric reads, an independent ZMQ subscriber, replay, polling."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import httpx
import openai
import zmq
from prometheus_client.parser import text_string_to_metric_families

from kvindex.events import decode_batch

MODEL = "kvgate/demo-8b"


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)


def metrics(url: str) -> dict[str, list]:
    """name -> samples, parsed with prometheus_client's own parser (fails on bad exposition text)."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of a sample's values (0.0 when absent)."""
    return sum(s.value for s in metrics(url).get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


def wait_for(cond: Callable[[], bool], timeout: float = 5.0, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {message}")


class Subscriber:
    """An independent ZMQ SUB on a replica's event endpoint."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        time.sleep(0.2)  # slow joiner

    def drain(self, wait_s: float = 0.5) -> list[tuple[int, object]]:
        return [(seq, decode_batch(payload)) for _, seq, payload in self.raw(wait_s)]

    def raw(self, wait_s: float = 0.5) -> list[tuple[bytes, int, bytes]]:
        out = []
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.sock.poll(50):
                topic, seq, payload = self.sock.recv_multipart()
                out.append((topic, int.from_bytes(seq, "big"), payload))
        return out

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def replay(endpoint: str, start: int, timeout_ms: int = 2000) -> list[list[bytes]]:
    """Ask a replay ROUTER for everything from ``start``; the reply frames up to the end marker."""
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(endpoint)
    dealer.send_multipart([b"", start.to_bytes(8, "big")])
    out = []
    try:
        while dealer.poll(timeout_ms):
            frames = dealer.recv_multipart()
            out.append(frames)
            if frames[-2] == b"\xff" * 8:
                break
        else:
            raise AssertionError("replay did not end with the ff*8 marker")
    finally:
        dealer.close(0)
        ctx.term()
    return out


PREFILL_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def pd_prompt(tag: str) -> str:
    return f"P/D {tag} {uuid.uuid4().hex}: " + " ".join(f"fact {i} is that item {i} costs {i * 3} coins;" for i in range(30))


def two_hop(pre, dec, prompt: str, rid: str | None = None, **extra) -> tuple[dict, dict, dict]:
    headers = {"X-Request-Id": rid or uuid.uuid4().hex}
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 5, **extra}
    r1 = httpx.post(
        f"{pre.url}/v1/completions", json={**body, "max_tokens": 1, "stream": False, "kv_transfer_params": PREFILL_PARAMS}, headers=headers, timeout=30
    )
    assert r1.status_code == 200, r1.text
    kv = r1.json()["kv_transfer_params"]
    r2 = httpx.post(f"{dec.url}/v1/completions", json={**body, "kv_transfer_params": kv}, headers=headers, timeout=30)
    assert r2.status_code == 200, r2.text
    return r1.json(), kv, r2.json()
