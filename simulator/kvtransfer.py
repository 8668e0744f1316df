"""KV bytes between simulated replicas, the way vLLM's NixlConnector moves them (pull mode).

Each replica owns a host-memory buffer of ``num_blocks × block_bytes`` registered with a NIXL
agent (UCX backend; no GPU needed). A small TCP side channel plays the role of vLLM's NIXL
handshake: the decode side connects to the prefill side's ``remote_host:remote_port``, fetches
its agent metadata and buffer layout once (cached), then issues a NIXL READ of the prefill's
blocks into its own blocks, with the prefill's request id as the completion notification. The
prefill side polls its notifications and releases the request's blocks when the read is done.

When NIXL cannot be imported or initialised, the same side channel carries the bytes itself
(``backend == "tcp"``), so the simulator works anywhere; the start-up log says which is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

log = logging.getLogger("kvgate.sim.kvtransfer")

_LEN = struct.Struct(">I")
_MAX_MSG = 1 << 30
_TCP_CHUNK = 16 << 20  # bytes per side-channel read message
_BUSY_POLL_S = 0.002  # NIXL progress/notification poll while a lease is outstanding
_IDLE_POLL_S = 0.1  # ... and while none is


class KVTransferError(RuntimeError):
    """A pull failed: peer unreachable, wrong engine id, bad block ids, or a timeout."""


@dataclass
class TransferStats:
    backend: str = "tcp"
    transfers: int = 0
    bytes_pulled: int = 0
    seconds_total: float = 0.0
    failures: int = 0


@dataclass
class _Peer:
    engine_id: str
    backend: str
    agent_name: str | None
    base: int
    block_bytes: int
    num_blocks: int


async def _send(writer: asyncio.StreamWriter, obj: Any) -> None:
    data = msgspec.msgpack.encode(obj)
    writer.write(_LEN.pack(len(data)) + data)
    await writer.drain()


async def _recv(reader: asyncio.StreamReader) -> Any:
    (n,) = _LEN.unpack(await reader.readexactly(4))
    if n > _MAX_MSG:
        raise KVTransferError("side-channel message too large")
    return msgspec.msgpack.decode(await reader.readexactly(n))


class KVTransfer:
    """One per simulated replica: a registered host-memory KV buffer plus a side channel."""

    def __init__(
        self, engine_id: str, num_blocks: int, block_bytes: int, *, host: str = "127.0.0.1", side_channel_port: int = 0, prefer_nixl: bool = True
    ) -> None:
        self.engine_id = engine_id
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self.host = host
        self._port = side_channel_port
        self.prefer_nixl = prefer_nixl
        self.backend = "tcp"
        self.buffer = np.zeros(num_blocks * block_bytes, dtype=np.uint8)
        self.stats = TransferStats()
        self._agent: Any = None
        self._server: asyncio.base_events.Server | None = None
        self._peers: dict[tuple[str, int, str], _Peer] = {}
        self._remote_agents: set[str] = set()
        self._release_cb: Callable[[str], None] | None = None
        self._notif_task: asyncio.Task | None = None
        self._pending = asyncio.Event()
        #: set by the owner: whether any lease waits for a decode replica's notification
        self.has_pending: Callable[[], bool] = lambda: False
        #: the backend the last successful pull used ("nixl" or "tcp")
        self.last_backend: str | None = None
        self.timeout_s = 10.0

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.prefer_nixl:
            self._init_nixl()
        self._server = await asyncio.start_server(self._serve, self.host, self._port)
        self._port = self._server.sockets[0].getsockname()[1]
        if self._agent is not None:
            self._notif_task = asyncio.create_task(self._poll_notifications())
        log.info("kv transfer for %s: backend %s, side channel %s:%d", self.engine_id, self.backend, self.host, self._port)

    def _init_nixl(self) -> None:
        try:
            # NIXL's import configures its own logger at INFO on stdout; NIXL_LOG_LEVEL is what it reads
            os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
            from nixl._api import nixl_agent, nixl_agent_config

            logging.getLogger("nixl").setLevel(logging.WARNING)

            # No progress thread: NIXL's spins without a pause (pthrDelay 0), up to a whole core
            # per replica even while idle, which on a small machine starves every simulated
            # replica's scheduler loop. Progress is driven from the event loop instead, as vLLM's worker
            # does each step: check_xfer_state while pulling, get_new_notifs in _poll_notifications.
            agent = nixl_agent(self.engine_id, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
            agent.register_memory([(self.buffer.ctypes.data, self.buffer.nbytes, 0, "")], "DRAM")
        except Exception as exc:  # not installed, or UCX unusable here
            log.warning("NIXL unavailable (%s): KV transfers use the TCP side channel", exc)
            return
        self._agent = agent
        self.backend = "nixl"
        self.stats.backend = "nixl"

    @property
    def side_channel_port(self) -> int:
        return self._port

    async def close(self) -> None:
        if self._notif_task is not None:
            self._notif_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._notif_task
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)

    # -- local blocks ---------------------------------------------------------------------------

    def _check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not (0 <= i < self.num_blocks)]
        if bad:
            raise KVTransferError(f"block ids out of range 0..{self.num_blocks - 1}: {bad[:5]}")

    def write_block(self, block_id: int, data: bytes) -> None:
        self._check_ids([block_id])
        n = min(len(data), self.block_bytes)
        off = block_id * self.block_bytes
        self.buffer[off : off + n] = np.frombuffer(data[:n], dtype=np.uint8)

    def read_block(self, block_id: int) -> bytes:
        self._check_ids([block_id])
        off = block_id * self.block_bytes
        return self.buffer[off : off + self.block_bytes].tobytes()

    def set_release_callback(self, cb: Callable[[str], None]) -> None:
        self._release_cb = cb

    def _released(self, request_id: str) -> None:
        if self._release_cb is not None:
            self._release_cb(request_id)

    # -- serving side (prefill) -----------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                msg = await _recv(reader)
                op = msg.get("op") if isinstance(msg, dict) else None
                if op == "meta":
                    await _send(
                        writer,
                        {
                            "engine_id": self.engine_id,
                            "backend": self.backend,
                            "agent_meta": self._agent.get_agent_metadata() if self._agent is not None else None,
                            "base": int(self.buffer.ctypes.data),
                            "block_bytes": self.block_bytes,
                            "num_blocks": self.num_blocks,
                        },
                    )
                elif op == "read":
                    ids = [int(i) for i in msg.get("ids", [])]
                    try:
                        self._check_ids(ids)
                    except KVTransferError as exc:
                        await _send(writer, {"error": str(exc)})
                        continue
                    await _send(writer, {"data": b"".join(self.read_block(i) for i in ids)})
                elif op == "release":
                    self._released(str(msg.get("request_id", "")))
                    await _send(writer, {"ok": True})
                else:
                    await _send(writer, {"error": f"unknown op {op!r}"})
        except (asyncio.IncompleteReadError, ConnectionError, KVTransferError, msgspec.DecodeError):
            pass
        finally:
            writer.close()

    def wake(self) -> None:
        """A lease was taken: start polling for the decode side's notifications."""
        self._pending.set()

    async def _poll_notifications(self) -> None:
        """Drive this agent's UCX progress and pick up decode peers' notifications.

        Without a progress thread the serving side only answers a peer's READ (UCX here
        emulates RMA with active messages over TCP, so the target must progress) and only
        receives the "pulled" notification when this loop calls into NIXL: every
        ``_BUSY_POLL_S`` while a lease is outstanding, every ``_IDLE_POLL_S`` otherwise (a
        late pull, keepalives), so an idle replica costs next to nothing.
        """
        while True:
            try:
                notifs = self._agent.get_new_notifs()
            except Exception:
                notifs = {}
            for msgs in notifs.values():
                for m in msgs:
                    self._released(m.decode(errors="replace"))
            if self.has_pending():
                await asyncio.sleep(_BUSY_POLL_S)
            else:
                self._pending.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._pending.wait(), _IDLE_POLL_S)

    # -- pulling side (decode) ------------------------------------------------------------------

    async def _peer(self, host: str, port: int, engine_id: str) -> _Peer:
        key = (host, port, engine_id)
        peer = self._peers.get(key)
        if peer is not None:
            return peer
        meta = await self._rpc(host, port, {"op": "meta"})
        if meta.get("engine_id") != engine_id:
            raise KVTransferError(f"side channel {host}:{port} serves engine {meta.get('engine_id')!r}, not {engine_id!r}")
        agent_name = None
        if self._agent is not None and meta.get("backend") == "nixl" and meta.get("agent_meta"):
            agent_name = self._agent.add_remote_agent(meta["agent_meta"])
            if isinstance(agent_name, bytes):
                agent_name = agent_name.decode()
        peer = _Peer(engine_id, meta.get("backend", "tcp"), agent_name, int(meta["base"]), int(meta["block_bytes"]), int(meta["num_blocks"]))
        if peer.block_bytes != self.block_bytes:
            raise KVTransferError(f"block size mismatch: remote {peer.block_bytes} bytes, local {self.block_bytes}")
        self._peers[key] = peer
        return peer

    async def _rpc(self, host: str, port: int, msg: dict) -> dict:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), self.timeout_s)
        except (OSError, TimeoutError) as exc:
            raise KVTransferError(f"side channel {host}:{port} unreachable: {exc}") from None
        try:
            await _send(writer, msg)
            reply = await asyncio.wait_for(_recv(reader), self.timeout_s)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as exc:
            raise KVTransferError(f"side channel {host}:{port} failed: {type(exc).__name__}") from None
        finally:
            writer.close()
        if not isinstance(reply, dict) or "error" in reply:
            raise KVTransferError(f"side channel {host}:{port}: {reply.get('error') if isinstance(reply, dict) else reply}")
        return reply

    async def pull(
        self, *, remote_host: str, remote_port: int, remote_engine_id: str, remote_request_id: str, remote_block_ids: list[int], local_block_ids: list[int]
    ) -> int:
        """READ the remote blocks into the local ones, then tell the remote it may free them."""
        if len(remote_block_ids) != len(local_block_ids):
            raise KVTransferError("remote and local block lists differ in length")
        self._check_ids(local_block_ids)
        t0 = time.perf_counter()
        try:
            peer = await self._peer(remote_host, remote_port, remote_engine_id)
            bad = [i for i in remote_block_ids if not (0 <= i < peer.num_blocks)]
            if bad:
                raise KVTransferError(f"remote block ids out of range: {bad[:5]}")
            if peer.agent_name is not None and self._agent is not None:
                await self._nixl_read(peer, remote_request_id, remote_block_ids, local_block_ids)
            else:
                # bounded messages: a 4k-token prompt of a real model is hundreds of MiB
                per = max(1, _TCP_CHUNK // self.block_bytes)
                for a in range(0, len(remote_block_ids), per):
                    reply = await self._rpc(remote_host, remote_port, {"op": "read", "ids": remote_block_ids[a : a + per]})
                    data = reply["data"]
                    for j, bid in enumerate(local_block_ids[a : a + per]):
                        self.write_block(bid, data[j * self.block_bytes : (j + 1) * self.block_bytes])
                await self._rpc(remote_host, remote_port, {"op": "release", "request_id": remote_request_id})
        except KVTransferError:
            self.stats.failures += 1
            self._forget(remote_host, remote_port, remote_engine_id)
            raise
        moved = len(local_block_ids) * self.block_bytes
        self.last_backend = "nixl" if peer.agent_name is not None and self._agent is not None else "tcp"
        self.stats.transfers += 1
        self.stats.bytes_pulled += moved
        self.stats.seconds_total += time.perf_counter() - t0
        return moved

    async def notify_release(self, remote_host: str, remote_port: int, remote_engine_id: str, remote_request_id: str) -> None:
        """Tell the prefill replica it may free a request's blocks without reading them
        (a full local prefix hit, or the decode request was aborted): a NIXL notification
        when both sides run NIXL, else the side channel."""
        try:
            peer = await self._peer(remote_host, remote_port, remote_engine_id)
            if peer.agent_name is not None and self._agent is not None:
                self._agent.send_notif(peer.agent_name, remote_request_id.encode())
            else:
                await self._rpc(remote_host, remote_port, {"op": "release", "request_id": remote_request_id})
        except KVTransferError as exc:
            log.info("could not notify %s:%s to free %s: %s", remote_host, remote_port, remote_request_id, exc)
        except Exception as exc:  # a NIXL error must not kill the caller
            log.info("NIXL notification to %s failed: %s", remote_engine_id, exc)

    def _forget(self, host: str, port: int, engine_id: str) -> None:
        """Drop a cached peer (it may have restarted with a new agent and buffer)."""
        peer = self._peers.pop((host, port, engine_id), None)
        if peer is not None and peer.agent_name is not None and self._agent is not None:
            with contextlib.suppress(Exception):
                self._agent.remove_remote_agent(peer.agent_name)

    async def _nixl_read(self, peer: _Peer, request_id: str, remote_ids: list[int], local_ids: list[int]) -> None:
        agent = self._agent
        bb = self.block_bytes
        local_base = int(self.buffer.ctypes.data)
        local = [(local_base + i * bb, bb, 0) for i in local_ids]
        remote = [(peer.base + i * bb, bb, 0) for i in remote_ids]
        handle = agent.initialize_xfer("READ", agent.get_xfer_descs(local, "DRAM"), agent.get_xfer_descs(remote, "DRAM"), peer.agent_name, request_id.encode())
        try:
            state = agent.transfer(handle)
            deadline = time.monotonic() + self.timeout_s
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise KVTransferError(f"NIXL READ from {peer.engine_id} timed out")
                await asyncio.sleep(0.0002)
                state = agent.check_xfer_state(handle)
            if state != "DONE":
                raise KVTransferError(f"NIXL READ from {peer.engine_id} failed ({state})")
        finally:
            with contextlib.suppress(Exception):
                agent.release_xfer_handle(handle)


async def _bench(blocks: int = 256, block_kib: int = 2048, repeats: int = 3) -> None:
    """Pull ``blocks`` blocks of ``block_kib`` KiB between two agents in this process, NIXL vs TCP.

    The default is a realistic P/D transfer: a 4k-token prompt of an 8B Llama-like model
    (128 KiB of KV per token, 16-token blocks = 2 MiB per block) = 512 MiB, as one READ of
    256 descriptors. Reports the best of ``repeats`` pulls.
    """
    total = blocks * block_kib * 1024
    for prefer in (True, False):
        src = KVTransfer("bench-src", blocks, block_kib * 1024, prefer_nixl=prefer)
        dst = KVTransfer("bench-dst", blocks, block_kib * 1024, prefer_nixl=prefer)
        await src.start()
        await dst.start()
        src.buffer[:] = np.random.default_rng(0).integers(0, 255, src.buffer.size, dtype=np.uint8)
        src.has_pending = lambda: True  # a prefill replica with a lease out drives its side's progress
        src.wake()
        ids = list(range(blocks))
        await dst.pull(
            remote_host="127.0.0.1",
            remote_port=src.side_channel_port,
            remote_engine_id="bench-src",
            remote_request_id="warm",
            remote_block_ids=ids[:1],
            local_block_ids=ids[:1],
        )
        best = float("inf")
        for k in range(repeats):
            dst.buffer[:] = 0
            t0 = time.perf_counter()
            await dst.pull(
                remote_host="127.0.0.1",
                remote_port=src.side_channel_port,
                remote_engine_id="bench-src",
                remote_request_id=f"r{k}",
                remote_block_ids=ids,
                local_block_ids=ids,
            )
            best = min(best, time.perf_counter() - t0)
            assert bytes(dst.buffer[-4096:]) == bytes(src.buffer[-4096:]) and bytes(dst.buffer[:4096]) == bytes(src.buffer[:4096])
        print(f"{dst.last_backend}: {blocks} blocks x {block_kib} KiB = {total / 2**20:.0f} MiB in {best * 1000:.1f} ms = {total / 2**20 / best:.0f} MiB/s")
        await dst.close()
        await src.close()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="KV transfer rate between two simulated replicas' buffers (NIXL vs TCP side channel)")
    ap.add_argument("--bench", action="store_true", help="run the benchmark")
    ap.add_argument("--blocks", type=int, default=256)
    ap.add_argument("--block-kib", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    if a.bench:
        logging.basicConfig(level=logging.WARNING)
        asyncio.run(_bench(a.blocks, a.block_kib, a.repeats))
