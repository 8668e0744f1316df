"""Where the gateway's CPU goes: CPU time per request, split by stage.

``kvgate serve`` runs in its own process (memory index, KV-event ingestion on) in front of 4
simulated replicas (one process each, KV events and replay on) at time scale 0, so the
replicas answer as fast as Python can and the gateway's own cost is what is measured; with
``--time-scale 1`` they pace prefill and decode steps as the GPU would, so a stream's events
arrive one decode step apart (each relayed on its own wake-up) and KV events one batch per
engine step per replica, as in the peer benchmark. The load
generator (asyncio + aiohttp, in this process) sends a fixed number of requests per pass at a
fixed concurrency. Scenarios: short (~50 tokens) and long (~2.4k tokens) prompts, chat and
completions, streaming and not. Every prompt is unique (the gateway's token cache never hits);
a long prompt is one of 8 documents plus a unique question, as in document QA, so the index
finds a long cached prefix and the replicas publish KV events for the new blocks.

Each round runs every scenario twice, in the same order:

* a **measured** pass: the gateway's CPU time (utime + stime of all its threads, from
  ``/proc``) over the pass, divided by its requests → CPU ms per request; and requests/s;
* a **profiled** pass: the same load with ``py-spy record --gil --nonblocking`` sampling the
  thread that holds the GIL (never pausing the gateway), and each thread's CPU read from
  ``/proc/PID/task/TID/schedstat``. Each sample goes to the stage of its innermost frame that
  a rule of ``STAGE_RULES`` names (a Prometheus call made while relaying counts as metrics, a
  ``logging`` call anywhere as logging) and stands for 1/rate s of its thread's CPU; what a
  thread spent with the GIL released is the rest of its CPU: on the event-loop thread
  uvloop's C code (epoll, socket reads) and libzmq (the loop stage), less HF tokenizers'
  encode of prompts tokenized inline (measured by re-running the same encodes here); on a
  tokenize-pool thread the encode. Native threads py-spy cannot see go to their stage by name
  (``NATIVE_THREADS``: ZMQ's I/O thread is ingest).

Why this way (each checked on this 2-core VM): py-spy's default mode counts a thread
whenever it is runnable, and on a loaded machine the loop thread queues for a CPU right after
every write that wakes a replica, which piled samples onto socket writes; its pausing mode
inflated the loop thread's samples to 1.4-2.4x its CPU; without ``--gil``, the gap between
py-spy reading a thread's state and its stack made a loop that works in 20-µs bursts look
idle-in-C half the time. So the gateway runs at nice -10 with its event-loop thread
SCHED_FIFO (it runs whenever runnable, as on a core of its own; py-spy runs SCHED_FIFO above
it), and the sampled GIL time is checked against the loop thread's CPU every pass (printed:
"loop thread: N% of its CPU with the GIL").

Rounds are interleaved (round 1: every scenario, round 2: every scenario, ...) so every
scenario sees the same drift of the machine; the table gives medians over rounds and their
range. ``--compare-root DIR`` runs a second gateway from another source tree (e.g. a ``git
archive`` of the commit before a change) in front of the same replicas: each pass runs on both
gateways back to back, the first one alternating by round, and the ratio of the two passes of
a round (main / compare) is what a change is judged by: the machine drifts less within a round
than across runs. Stage shares pool the profiled passes; stage milliseconds are share × the measured
CPU ms per request. The measured passes never run with the profiler attached, so CPU per
request is not inflated by it (the profiled passes' own CPU is printed next to it).

If py-spy is missing or cannot attach (it needs ptrace), the gateway is restarted under
cProfile instead (``CPROFILE_BOOT``: on only during the profiled passes, switched by
signals, CPU-time clock); stages then come from the loop thread's self times (built-ins
charged to their callers), the other threads by name. Coarser, and the output says so.

    python -m benchmarks.bench_cpu [--quick] [--requests N] [--rounds R] [--json PATH] [--stacks DIR]
        [--time-scale 1 --concurrency 32] [--compare-root DIR] [--no-profile] [--env KEY=VALUE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

MODEL = "kvgate/demo-8b"
ROOT = Path(__file__).resolve().parents[1]

# -- stages --------------------------------------------------------------------------------------

#: the stages, in table order, with what each holds
STAGES: dict[str, str] = {
    "http": "HTTP parse: uvicorn/httptools callbacks, reading the request body, JSON decode + validation (gateway/intake.py)",
    "tokenize": "tokenization: HF tokenizers, the token cache, the hop to the tokenize pool and back",
    "template": "chat template render (jinja2)",
    "block_keys": "kvgate block keys (kvindex/hashing.py)",
    "index": "index lookup (memory index)",
    "schedule": "scheduler: filters, scorers, picker, dispatch/complete hooks (scorers/)",
    "upstream": "upstream connect/send: the request to the replica (pool, head, body write) up to its response headers",
    "relay": "relay: reading the replica's answer (HTTP parser callbacks, buffers) and writing it to the client, chunk by chunk",
    "metrics": "Prometheus client (counters, histograms, label lookups)",
    "logging": "logging",
    "ingest": "KV-event ingest: ZMQ (its I/O thread too), event decode, index apply",
    "loop": "the event loop's own C code (uvloop: epoll, socket reads, callbacks) with no Python frame of its own",
    "background": "not per request: health probes and metric scrapes of the replicas (httpx, Prometheus text parsing)",
    "other": "the rest: request plumbing in gateway/ (app, intake, routing, hops, forward bookkeeping, fleet counters)",
}

#: (stage, file regex, function regex or None), in order: a frame takes the stage of the first
#: rule it matches (the function regex is matched against the last part of the qualified name);
#: stage "" marks plumbing called from everywhere, which never decides (the frame's caller
#: does); "~stage" decides only if no other frame does (a torn stack). A sample takes the
#: stage of its innermost frame that has one.
STAGE_RULES: list[tuple[str, str, str | None]] = [
    # logging and metrics: wherever they are called from, they are that cost
    ("logging", r"(^|/)logging/", None),
    ("logging", r"gateway/server\.py", r"^format$"),
    # background work, not per request: health probes and metric scrapes (httpx), their parsing
    ("background", r"gateway/fleet\.py", r"^(probe|probe_all|scrape|scrape_all|parse_vllm_metrics|_labels|_apply_discovery|_loop|start)$"),
    ("background", r"prometheus_client/parser\.py", None),
    ("background", r"(^|/)(httpx|httpcore|h11|anyio|sniffio|certifi|idna)/", None),
    ("background", r"(^|/)(http/cookiejar|urllib/request|urllib/parse|ipaddress)\.py", None),
    ("background", r"uvicorn/server\.py", r"^(main_loop|on_tick)$"),
    ("metrics", r"prometheus_client/", None),
    ("metrics", r"gateway/metrics\.py", None),
    # routing's stages
    ("template", r"jinja2/", None),
    ("template", r"kvindex/tokenize\.py", r"^(render_chat|_compile|_from_string|resolve_template_kwargs|_new_env|_tojson|_raise|apply_chat_template)$"),
    ("template", r"^<template>$", None),
    ("tokenize", r"tokenizers/", None),
    ("tokenize", r"kvindex/(tokenize|demo_tokenizer)\.py", None),
    ("tokenize", r"gateway/routing\.py", r"^(_tokenize|tokens_for|_completion_tokens|_chat_tokens|_chat_options|tokenizer_for|completion_prompts|_check_ids)$"),
    # the tokenize pool: the executor's threads and the hop back to the loop
    ("tokenize", r"concurrent/futures/", None),
    (
        "tokenize",
        r"asyncio/futures\.py",
        r"^(wrap_future|_chain_future|_call_set_state|_call_check_cancel|_copy_future_state|_set_concurrent_future_state|_set_state)$",
    ),
    ("tokenize", r"(^|/)(threading|queue)\.py", None),
    ("block_keys", r"kvindex/hashing\.py", None),
    ("index", r"kvindex/memory_index\.py", r"^(lookup|lookup_now|_carried)$"),
    ("index", r"kvindex/index\.py", r"^block_size$"),
    ("index", r"gateway/routing\.py", r"^(lookup|block_size)$"),
    ("ingest", r"kvindex/(subscriber|events|event_rules|memory_index|index|outage)\.py", None),
    ("ingest", r"(^|/)zmq/", None),
    ("schedule", r"(^|/)scorers/", None),
    ("schedule", r"gateway/routing\.py", r"^decide$"),
    # the replica side: the answer read and relayed, the request sent
    ("relay", r"gateway/forward\.py", r"^(__call__|broken|relay|_raw_headers)$"),
    # the upstream client (gateway/proxy.py): its protocol's callbacks are mostly the body
    (
        "relay",
        r"gateway/proxy\.py",
        r"^(aiter_raw|first_chunk|aread|relay|relay_headers|aclose|data_received|on_body|on_message_complete|on_header|on_headers_complete"
        r"|_head|_eof|_error|_wake|_wait|_take|_raise|_complete|_fail|_abort|pause|resume|_on_timer|set_timeout|_stop_timer|connection_lost)$",
    ),
    ("relay", r"gateway/connections\.py", r"^(put|drain|write|sink|for_send)$"),
    ("relay", r"aiohttp/(streams|client_proto|_http_parser|http_parser|helpers)\.py", None),
    ("relay", r"aiohttp/client_reqrep\.py", r"^(read|release|close|_release_connection|_response_eof|_notify_content|_cleanup_writer|text|json)$"),
    ("relay", r"starlette/responses\.py", None),
    ("upstream", r"gateway/proxy\.py", None),
    ("upstream", r"gateway/forward\.py", r"^(attempt|send)$"),
    ("upstream", r"(^|/)aiohttp/", None),
    ("upstream", r"(^|/)(yarl|multidict|aiohappyeyeballs|propcache)/", None),
    # the client side; uvicorn's send is the response write, charged to whoever writes (most
    # often the relay)
    ("~relay", r"uvicorn/protocols/http/httptools_impl\.py", r"^(send|_send)$"),
    ("", r"gateway/app\.py", r"^tracking_send$"),
    ("http", r"uvicorn/protocols/", None),
    ("http", r"gateway/connections\.py", None),
    ("http", r"starlette/", None),
    ("http", r"gateway/intake\.py", r"^(read_body|decode_json|validate_body|_is_prompt|_is_token_ids|_depth_exceeds|accept|check)$"),
    ("http", r"(^|/)msgspec/", None),
    # plumbing, then the gateway's own glue (a request's outer frames: they decide last)
    ("", r"(^|/)asyncio/", None),
    ("", r"(^|/)(contextlib|functools|typing|abc|enum|weakref|_weakrefset|copy|dataclasses)\.py", None),
    ("other", r"^(gateway|scorers|kvindex)/", None),
]

#: a sample whose innermost frame is the loop runner: the loop's C code is running
LOOP_LEAF = re.compile(r"asyncio/runners\.py$")

#: native threads py-spy cannot see, by their name (/proc/PID/task/TID/comm) → stage, label; a
#: thread named like the interpreter that is no Python thread is one of HF tokenizers' (rayon)
NATIVE_THREADS: list[tuple[str, str, str]] = [
    (r"^ZMQbg/", "ingest", "[ZMQ I/O threads (native)]"),
    (r"^python", "tokenize", "[HF tokenizers' worker threads (native; in the cProfile fallback also the tokenize pool)]"),
    (r"^libuv-worker", "other", "[uvloop's thread pool (native: getaddrinfo, ...)]"),
]

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True, slots=True)
class Frame:
    func: str
    file: str

    @property
    def label(self) -> str:
        return f"{self.func} ({self.file})"


def parse_frame(text: str) -> Frame:
    m = _FRAME.match(text)
    return Frame(text, "") if m is None else Frame(m["func"], m["file"])


class Classifier:
    def __init__(self) -> None:
        self.rules = [(stage, re.compile(f), re.compile(fn) if fn else None) for stage, f, fn in STAGE_RULES]
        self._cache: dict[Frame, str | None] = {}

    def frame_stage(self, fr: Frame) -> str | None:
        """The stage one frame belongs to: "" for plumbing, None for no rule."""
        if fr not in self._cache:
            name = fr.func.rpartition(".")[2]
            self._cache[fr] = next((stage for stage, f, fn in self.rules if f.search(fr.file) and (fn is None or fn.search(name))), None)
        return self._cache[fr]

    def stack_stage(self, frames: tuple[Frame, ...]) -> str:
        """The innermost frame with a stage decides; a stack that ends in the loop runner is the loop."""
        if not frames or LOOP_LEAF.search(frames[-1].file):
            return "loop"
        weak = ""
        for fr in reversed(frames):
            st = self.frame_stage(fr)
            if st and st[0] == "~":
                weak = weak or st[1:]
            elif st:
                return st
        return weak or "other"


def _innermost_python(stack: tuple[Frame, ...]) -> str:
    return stack[-1].label if stack else "?"


_ENCODE = re.compile(r"^(Caching)?Tokenizer\.(encode|_encoding|chat_tokens|encode_chat)$")


def _encodes(stack: tuple[Frame, ...]) -> bool:
    """A sample taken inside an encode (its Python part: cache key, cache, the ids)."""
    return any(fr.file.endswith("kvindex/tokenize.py") and _ENCODE.match(fr.func) for fr in stack)


#: the loop thread's CPU without the GIL (no sample can show it)
LOOP_RESIDUAL = ("loop", "[event loop thread without the GIL: uvloop's C code (epoll, socket reads), libzmq]")


def native_thread(comm: str) -> tuple[str, str] | None:
    """(stage, label) of a native thread py-spy cannot see, None for the others."""
    return next(((stage, label) for rx, stage, label in NATIVE_THREADS if re.search(rx, comm)), None)


_THREAD = re.compile(r"^thread \((\d+)\)(?::\s*(.*))?$")


@dataclass
class Profile:
    """One profiled pass: collapsed stacks per thread id (py-spy ``--threads``), or self CPU
    seconds per (stage, function) of the main thread (the cProfile fallback)."""

    stacks: Counter[tuple[int, tuple[Frame, ...]]] = field(default_factory=Counter)
    names: dict[int, str] = field(default_factory=dict)
    self_time: Counter[tuple[str, Frame]] = field(default_factory=Counter)

    def add_raw(self, text: str) -> None:
        for line in text.splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            parts = stack.split(";")
            m = _THREAD.match(parts[0])
            tid = 0
            if m is not None:
                tid = int(m[1])
                self.names[tid] = (m[2] or "").strip()
                parts = parts[1:]
            self.stacks[(tid, tuple(parse_frame(f) for f in parts))] += int(count)

    @property
    def samples(self) -> float:
        return sum(self.stacks.values()) + sum(self.self_time.values())

    def per_thread(self) -> Counter[int]:
        out: Counter[int] = Counter()
        for (tid, _stack), n in self.stacks.items():
            out[tid] += n
        return out

    def inclusive(self, rx: re.Pattern[str], weight: dict[int, float], inclusive: bool = True) -> float:
        """CPU seconds of the samples with a frame matching ``rx`` (on "func (file)"); not
        inclusive: with an innermost frame matching it. ``weight``: seconds per sample, per thread."""
        return sum(
            n * weight.get(tid, 0.0)
            for (tid, stack), n in self.stacks.items()
            if stack and any(rx.search(fr.label) for fr in (stack if inclusive else stack[-1:]))
        )


# -- the stack -----------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pdeathsig() -> list[str]:
    """Children die with this process even if it is killed (``setpriv --pdeathsig``, Linux)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL"] if setpriv else []


#: ``kvgate serve`` under cProfile (CPU-time clock), off until SIGUSR1 (clear + on); SIGUSR2
#: dumps the stats to $KVGATE_BENCH_CPROFILE and switches it off
CPROFILE_BOOT = """
import cProfile, os, signal, sys, time
prof = cProfile.Profile(time.thread_time)
out = os.environ["KVGATE_BENCH_CPROFILE"]
def _on(signum, frame):
    prof.disable(); prof.clear(); prof.enable()
def _dump(signum, frame):
    prof.disable(); prof.dump_stats(out + ".tmp"); os.replace(out + ".tmp", out)
signal.signal(signal.SIGUSR1, _on)
signal.signal(signal.SIGUSR2, _dump)
from gateway.cli import main
sys.argv[0] = "kvgate"
sys.exit(main())
"""


class Replica:
    """One simulated replica, ``python -m simulator.cli`` as ``SimFleet(mode="process")`` starts
    it (``simulator.fleet.cli_args``), with KV events, dying with this process; at time scale 0
    it answers at once, at 1 it paces prefill and decode steps like the GPU it stands for."""

    def __init__(self, i: int, time_scale: float = 0.0) -> None:
        from simulator.fleet import SimConfig, cli_args

        for _attempt in range(3):  # a port picked free may be taken before the replica binds it
            port = _free_port()
            cfg = SimConfig(model=MODEL, seed=i, time_scale=time_scale, port=port, kv_events=True, kv_events_port=_free_port(), replay_port=_free_port())
            cfg.engine_id = f"sim-{port}"
            self.url = f"http://127.0.0.1:{port}"
            self.events, self.replay = f"tcp://127.0.0.1:{cfg.kv_events_port}", f"tcp://127.0.0.1:{cfg.replay_port}"
            argv = [*_pdeathsig(), sys.executable, "-m", "simulator.cli", *cli_args(cfg)]
            self.proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": "0"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.proc.poll() is None:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(self.url + "/health", timeout=0.5).status_code == 200:
                        return
                time.sleep(0.05)
            self.stop()
        raise RuntimeError(f"simulated replica {i} did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_replicas(n: int, time_scale: float) -> list[Replica]:
    """``n`` simulated replicas (one process each), stopped again if one fails to start."""
    out: list[Replica] = []
    try:
        for i in range(n):
            out.append(Replica(i, time_scale))
    except BaseException:
        for r in out:
            r.stop()
        raise
    return out


class Stack:
    """``kvgate serve`` (a process) in front of the simulated replicas; with ``--compare-root``
    two of them, from two source trees, in front of the same replicas."""

    def __init__(
        self,
        tmp: Path,
        root: Path,
        replicas: list[Replica],
        cprofile: bool,
        nice: int = 0,
        extra: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.tmp = tmp
        self.env = env or {}
        tmp.mkdir(parents=True, exist_ok=True)
        self.nice = nice
        self.extra = extra or {}
        self.cprofile_out = tmp / "cprofile.out" if cprofile else None
        self.gw: subprocess.Popen[bytes] | None = None
        self.replicas = replicas
        self._start_gateway(root)

    def _start_gateway(self, root: Path) -> None:
        self.log = self.tmp / "gateway.log"
        for _attempt in range(3):  # a port picked free may be taken before the gateway binds it
            self.port = _free_port()
            cfg = {
                "listen": {"host": "127.0.0.1", "port": self.port},
                "replicas": [{"id": f"r{i}", "url": r.url, "models": [MODEL], "kv_events": r.events, "replay": r.replay} for i, r in enumerate(self.replicas)],
                "models": {MODEL: {"tokenizer": "demo"}},
                **self.extra,
            }
            path = self.tmp / "gateway.yaml"
            path.write_text(json.dumps(cfg))
            env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(root), **self.env}
            serve = ["serve", "--config", str(path)]
            if self.cprofile_out is not None:
                env["KVGATE_BENCH_CPROFILE"] = str(self.cprofile_out)
                argv = [sys.executable, "-c", CPROFILE_BOOT, *serve]
            else:
                argv = [sys.executable, "-m", "gateway.cli", *serve]
            with self.log.open("ab") as log:
                prio = [nice_exe, "-n", str(self.nice)] if self.nice and (nice_exe := shutil.which("nice")) else []
                self.gw = subprocess.Popen([*_pdeathsig(), *prio, *argv], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.gw.poll() is None:
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    r = httpx.get(f"{self.url}/ready", timeout=1)
                    if r.status_code == 200 and len(r.json()["healthy_replicas"]) == len(self.replicas):
                        return
                time.sleep(0.1)
            self._stop_gateway()
        raise RuntimeError(f"the gateway did not become ready; its log ends with:\n{self.log.read_text(errors='replace')[-2000:]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.gw is not None
        return self.gw.pid

    def make_realtime(self, prio: int) -> str:
        """Run the gateway's main thread (the event loop) SCHED_FIFO: it then runs whenever it is
        runnable, as on a core of its own, instead of queueing behind the replicas and the load
        generator (py-spy counts queueing as running). Returns what was done."""
        if prio <= 0:
            return "SCHED_OTHER"
        try:
            os.sched_setscheduler(self.pid, os.SCHED_FIFO, os.sched_param(prio))
        except (PermissionError, OSError) as exc:
            return f"SCHED_OTHER (SCHED_FIFO refused: {exc})"
        return f"SCHED_FIFO {prio}"

    def niceness(self) -> int:
        """The gateway's nice value as the kernel has it (``nice`` without root cannot lower it)."""
        with open(f"/proc/{self.pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[16])

    def _stop_gateway(self) -> None:
        if self.gw is not None and self.gw.poll() is None:
            self.gw.terminate()
            try:
                self.gw.wait(10)
            except subprocess.TimeoutExpired:
                self.gw.kill()
                self.gw.wait()

    def stop(self) -> None:
        self._stop_gateway()


# -- CPU clocks ----------------------------------------------------------------------------------


def process_cpu_s(pid: int) -> float:
    """utime + stime of the whole process (all threads, living and exited), in seconds (ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_times(pid: int) -> dict[int, tuple[str, int, int]]:
    """Per living thread: its name, its CPU time and its time waiting for a CPU (ns, schedstat)."""
    out: dict[int, tuple[str, int, int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                run, wait = f.read().split()[:2]
            out[int(tid)] = (comm, int(run), int(wait))
    return out


@dataclass
class ThreadUse:
    comm: str
    run_s: float  # on a CPU
    wait_s: float  # runnable, waiting for a CPU


@dataclass
class CpuUse:
    total_s: float  # the whole process
    threads: dict[int, ThreadUse]  # the living threads
    main_tid: int

    @property
    def main(self) -> ThreadUse:
        return self.threads.get(self.main_tid, ThreadUse("", 0.0, 0.0))


class CpuClock:
    """The gateway's CPU over an interval: the process's, and each thread's (ns precision)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.t0 = process_cpu_s(pid)
        self.threads0 = thread_times(pid)

    def read(self) -> CpuUse:
        ticks = process_cpu_s(self.pid) - self.t0
        threads = {}
        for tid, (comm, run, wait) in thread_times(self.pid).items():
            _, run0, wait0 = self.threads0.get(tid, (comm, 0, 0))
            threads[tid] = ThreadUse(comm, (run - run0) / 1e9, (wait - wait0) / 1e9)
        ns_total = sum(t.run_s for t in threads.values())
        # a thread that exited meanwhile took its time out of the ns sum: the ticks are sound then
        total = ns_total if abs(ns_total - ticks) <= 0.03 + 0.03 * ticks else ticks
        return CpuUse(total, threads, self.pid)


# -- the profilers --------------------------------------------------------------------------------


class PySpy:
    name = "py-spy --gil --nonblocking (the GIL holder's stack, the gateway never paused)"

    def __init__(self, pid: int, rate: int, tmp: Path, rt_prio: int = 0) -> None:
        self.exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self.pid, self.rate, self.tmp, self.rt_prio = pid, rate, tmp, rt_prio
        self.proc: subprocess.Popen[bytes] | None = None
        self.n = 0

    @classmethod
    def unavailable(cls, pid: int, tmp: Path) -> str | None:
        """None if py-spy can sample ``pid``, else why not."""
        exe = cls(pid, 100, tmp).exe
        if not Path(exe).exists():
            return "py-spy is not installed (pip install py-spy, or the bench extra)"
        try:
            r = subprocess.run([exe, "dump", "--pid", str(pid), "--nonblocking"], capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"py-spy dump failed: {exc}"
        if r.returncode != 0:
            return f"py-spy cannot attach: {(r.stderr or r.stdout).decode(errors='replace').strip()[:300]}"
        return None

    def python_threads(self) -> dict[int, str]:
        """The gateway's Python threads: OS thread id → name (``py-spy dump --json``)."""
        r = subprocess.run([self.exe, "dump", "--pid", str(self.pid), "--nonblocking", "--json"], capture_output=True, timeout=60)
        with contextlib.suppress(ValueError, TypeError, KeyError):
            return {int(t["os_thread_id"]): str(t.get("thread_name") or "") for t in json.loads(r.stdout) if t.get("os_thread_id")}
        return {}

    def start(self) -> None:
        self.n += 1
        self.out = self.tmp / f"spy-{self.n}.txt"
        argv = [self.exe, "record", "--pid", str(self.pid), "--format", "raw", "--function", "--threads", "--gil", "--nonblocking", "--rate", str(self.rate)]
        # above the gateway's SCHED_FIFO loop thread: a sampler below it could look only when
        # the loop thread has gone idle on that CPU, and would never see it run
        chrt = shutil.which("chrt")
        prio = [chrt, "--fifo", str(self.rt_prio)] if self.rt_prio > 0 and chrt else []
        self.proc = subprocess.Popen([*prio, *argv, "--output", str(self.out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # attached and sampling before the load starts
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise RuntimeError(f"py-spy record exited at once: {err[-500:]}")

    def stop(self) -> Profile:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)  # py-spy writes its output and exits
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise RuntimeError("py-spy did not stop") from None
        if not self.out.exists():
            raise RuntimeError(f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")
        prof = Profile()
        prof.add_raw(self.out.read_text())
        self.out.unlink()
        return prof


class CProfileSwitch:
    """The fallback: cProfile inside the gateway (``CPROFILE_BOOT``), switched by signals."""

    name = "cProfile (FALLBACK: py-spy could not be used; main thread only, other Python threads counted as tokenize)"

    def __init__(self, pid: int, out: Path, clf: Classifier) -> None:
        self.pid, self.out, self.clf = pid, out, clf

    def start(self) -> None:
        self.out.unlink(missing_ok=True)
        os.kill(self.pid, signal.SIGUSR1)
        time.sleep(0.5)

    def stop(self) -> Profile:
        import pstats

        os.kill(self.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not self.out.exists():  # the handler runs when the loop next runs Python code
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not dump its cProfile stats")
            time.sleep(0.05)
        stats: dict[Any, Any] = pstats.Stats(str(self.out)).stats  # type: ignore[attr-defined]
        prof = Profile()
        for (file, _line, func), (_cc, _nc, tt, _ct, callers) in stats.items():
            fr = Frame(func, _short(file))
            stage = (self.clf.frame_stage(fr) or "").lstrip("~") or ("loop" if "uvloop.Loop" in func else None)
            if stage:
                prof.self_time[(stage, fr)] += tt
                continue
            # a built-in or plumbing: charged to its callers' stages, in proportion
            total = sum(c[2] for c in callers.values())
            if not total:
                prof.self_time[("other", fr)] += tt
                continue
            for (cfile, _cl, cfunc), c in callers.items():
                prof.self_time[((self.clf.frame_stage(Frame(cfunc, _short(cfile))) or "").lstrip("~") or "other", fr)] += tt * c[2] / total
        return prof


def _short(path: str) -> str:
    """A cProfile file name as py-spy shortens it (from the package down)."""
    for marker in ("site-packages/", "/lib/python3.11/"):
        if marker in path:
            return path.split(marker, 1)[1]
    with contextlib.suppress(ValueError):
        return str(Path(path).resolve().relative_to(ROOT))
    return path


# -- the workload --------------------------------------------------------------------------------

_SYLL = "ka ri to ne mu sa lo pe di va gu shi an el or ix um et qua zen bro fil mar cor tin".split()


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(_SYLL) for _ in range(rng.randint(1, 3))) for _ in range(n))


@dataclass(frozen=True)
class Scenario:
    size: str  # short | long
    kind: str  # chat | completions
    stream: bool

    @property
    def name(self) -> str:
        return f"{self.size} {self.kind}{' stream' if self.stream else ''}"

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.kind == "chat" else "/v1/completions"


SCENARIOS = [Scenario(size, kind, stream) for size in ("short", "long") for kind in ("completions", "chat") for stream in (False, True)]


class Prompts:
    """Request bodies, every prompt unique in the whole run (a counter goes into each).

    short: ~50 tokens with the demo tokenizer; long: one of 8 ~2.35k-token documents (shared,
    so the replicas and the index hold their blocks) plus a unique question.
    """

    def __init__(self, seed: int = 7, short_words: int = 30, doc_words: int = 1520, question_words: int = 20) -> None:
        self.rng = random.Random(seed)
        self.short_words, self.question_words = short_words, question_words
        self.docs = [f"[document {d}] " + _words(self.rng, doc_words) for d in range(8)]
        self.systems = ["You are a helpful assistant. Answer briefly.", "You are a terse assistant."]
        self.n = 0

    def body(self, sc: Scenario, max_tokens: int) -> dict[str, Any]:
        self.n += 1
        i = self.n
        if sc.size == "short":
            system, user = self.systems[i % 2], f"[{i}] " + _words(self.rng, self.short_words - 16)
            prompt = f"[{i}] " + _words(self.rng, self.short_words)
        else:
            system, user = self.docs[i % len(self.docs)], f"Question {i}: " + _words(self.rng, self.question_words)
            prompt = f"{system}\n{user}"
        body: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "stream": sc.stream}
        if sc.kind == "chat":
            body["messages"] = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        else:
            body["prompt"] = prompt
        return body


def kv_events_applied(base: str) -> float:
    """The gateway's ``kvgate_kv_events_applied`` counters, summed over replicas."""
    with contextlib.suppress(httpx.HTTPError):
        text = httpx.get(base + "/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("kvgate_kv_events_applied"))
    return 0.0


class _TimedBackend:
    """An HF tokenizer whose encode calls add up the CPU they take (their GIL-released part)."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self.cpu_s = 0.0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._backend, name)
        if not name.startswith("encode"):
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.thread_time()
            try:
                return attr(*args, **kwargs)
            finally:
                self.cpu_s += time.thread_time() - t0

        return timed


def encode_cpu_s(sc: Scenario, bodies: list[dict[str, Any]]) -> float:
    """HF tokenizers' encode CPU per request for these bodies (the demo tokenizer, chat template
    applied), measured here: the part of tokenization that runs with the GIL released. Through
    the gateway's own token cache, warmed with the other half of the bodies first (same
    documents, other questions): a chat then encodes only its pieces not seen before, as in
    the gateway's steady state."""
    from kvindex.demo_tokenizer import build_demo_tokenizer
    from kvindex.tokenize import CachingTokenizer, ChatOptions, Tokenizer

    tok = Tokenizer.from_dir(build_demo_tokenizer())
    timed = _TimedBackend(tok._tok)
    tok._tok = timed
    cache = CachingTokenizer(tok)
    half = max(1, len(bodies) // 2)

    def run(batch: list[dict[str, Any]]) -> None:
        for b in batch:
            if sc.kind == "completions":
                cache.encode(b["prompt"], True)
            else:
                cache.chat_tokens(b["messages"], ChatOptions())

    run(bodies[half:])
    timed.cpu_s = 0.0
    run(bodies[:half])
    return timed.cpu_s / half


def prompt_tokens(sc: Scenario, bodies: list[dict[str, Any]]) -> float:
    """Mean prompt tokens as the gateway counts them (demo tokenizer, chat template applied)."""
    from kvindex.tokenize import load_tokenizer

    tok = load_tokenizer("demo")
    return statistics.mean(len(tok.encode_chat(b["messages"])) if sc.kind == "chat" else len(tok.encode(b["prompt"])) for b in bodies)


@dataclass
class PassResult:
    requests: int
    errors: int
    wall_s: float
    cpu: CpuUse
    events: int  # SSE data events received (streams)
    kv_events: float = 0.0  # KV events the gateway applied meanwhile (its /metrics)

    @property
    def cpu_ms_per_req(self) -> float:
        return self.cpu.total_s * 1e3 / self.requests

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s


async def drive(base: str, sc: Scenario, bodies: list[dict[str, Any]], concurrency: int, pid: int) -> PassResult:
    """Closed loop: ``concurrency`` workers send the bodies; the gateway's CPU is read around it."""
    import aiohttp

    encoded = [json.dumps(b).encode() for b in bodies]
    errors = events = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        url, headers = base + sc.path, {"content-type": "application/json"}

        async def health() -> None:
            async with session.get(base + "/health") as r:
                await r.read()

        await asyncio.gather(*(health() for _ in range(concurrency)))  # connections open before the clock starts
        it = iter(encoded)

        async def worker() -> None:
            nonlocal errors, events
            for data in it:
                async with session.post(url, data=data, headers=headers) as r:
                    body = await r.read()
                    if r.status != 200:
                        errors += 1
                    elif sc.stream:
                        events += body.count(b"data: ") - body.count(b"data: [DONE]")

        clock = CpuClock(pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        cpu = clock.read()
    return PassResult(len(bodies), errors, wall, cpu, events)


# -- the run -------------------------------------------------------------------------------------


@dataclass
class ScenarioResult:
    scenario: Scenario
    tokens: float = 0.0
    measured: list[PassResult] = field(default_factory=list)
    profiled: list[PassResult] = field(default_factory=list)
    stage_s: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))  # profiled passes: CPU seconds per stage
    func_s: defaultdict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))  # ... per (stage, innermost function)
    suspect_s: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))  # ... per suspect (inclusive)
    samples: float = 0.0
    #: per profiled pass: the share of the loop thread's CPU its Python samples account for (the
    #: rest is the loop's C code; above 100% the samples were scaled down), and its runqueue
    #: wait per CPU second (py-spy samples a runnable thread as if it ran: should be small)
    quality: list[dict[str, float]] = field(default_factory=list)
    main_residual_s: float = 0.0
    requests_profiled: int = 0
    encode_us_per_req: float = 0.0  # HF tokenizers encode CPU per request, measured in the bench process
    inline_encode_share: float = 0.0
    stacks: Counter[tuple[str, tuple[Frame, ...]]] = field(default_factory=Counter)  # (thread name, stack)

    def add_profile(self, prof: Profile, p: PassResult, clf: Classifier, rate: float | None, python_threads: dict[int, str]) -> None:
        """A profiled pass in CPU seconds, thread by thread (CPU from schedstat).

        py-spy (``--gil``): a Python thread's GIL samples are 1/rate s of its CPU each (at most
        its measured CPU: the loop thread runs real-time, so holding the GIL means running);
        the rest of its CPU ran with the GIL released: on the loop thread uvloop's C code
        (epoll, socket reads), libzmq and HF tokenizers' encode of prompts tokenized inline
        (``encode_s``: split off by ``split_inline_encode``); on a tokenize pool thread the
        encode. Native threads py-spy cannot see: by name (``NATIVE_THREADS``). cProfile
        fallback: the loop thread's self CPU seconds scaled to its measured CPU, every other
        Python thread counted as the tokenize pool.
        """
        threads, main = p.cpu.threads, p.cpu.main_tid
        counts = prof.per_thread()
        weight: dict[int, float] = {}  # CPU seconds per sample, per thread
        residual: dict[int, float] = {}  # CPU seconds no sample stands for, per Python thread
        for tid, use in threads.items():
            n = counts.get(tid, 0)
            # cProfile: the loop thread is its self times; the other threads go by name below
            if not prof.self_time and (tid == main or tid in python_threads or n > 0):
                sampled = min(use.run_s, n / rate) if rate and n else 0.0
                weight[tid] = sampled / n if n else 0.0
                residual[tid] = use.run_s - sampled
        for (tid, stack), n in prof.stacks.items():
            st = clf.stack_stage(stack)
            self.stacks[(prof.names.get(tid) or python_threads.get(tid) or str(tid), stack)] += n
            secs = n * weight.get(tid, 0.0)
            self.stage_s[st] += secs
            self.func_s[(st, _innermost_python(stack))] += secs
        if prof.self_time:  # cProfile: the loop thread's self CPU seconds, scaled to its measured CPU
            scale = p.cpu.main.run_s / (sum(prof.self_time.values()) or 1.0)
            for (st, fr), secs in prof.self_time.items():
                self.stage_s[st] += secs * scale
                self.func_s[(st, fr.label)] += secs * scale
        for tid, secs in residual.items():
            if tid == main:
                self.main_residual_s += secs
                self.stage_s["loop"] += secs
                self.func_s[LOOP_RESIDUAL] += secs
            elif (python_threads.get(tid) or prof.names.get(tid) or "").startswith("kvgate-tokenize"):
                self.stage_s["tokenize"] += secs
                self.func_s[("tokenize", "[tokenize pool: HF tokenizers encode, GIL released]")] += secs
            else:
                self.stage_s["other"] += secs
                self.func_s[("other", f"[Python thread {python_threads.get(tid) or tid}: CPU without the GIL]")] += secs
        for tid, use in threads.items():
            if tid in residual or tid == main or use.run_s <= 0:
                continue
            stage, label = native_thread(use.comm) or ("other", f"[native thread {use.comm}]")
            self.stage_s[stage] += use.run_s
            self.func_s[(stage, label)] += use.run_s
        for name, (rx, incl) in SUSPECTS.items():
            self.suspect_s[name] += prof.inclusive(re.compile(rx), weight, incl)
        self.samples += prof.samples
        if rate and p.cpu.main.run_s > 0:
            m = p.cpu.main
            self.quality.append({"loop_gil_share": 1 - residual.get(main, 0.0) / m.run_s, "loop_wait_per_cpu": m.wait_s / m.run_s})
        self.requests_profiled += p.requests

    def split_inline_encode(self, encode_s_per_req: float) -> None:
        """Move the loop thread's share of HF tokenizers' encode (GIL released, so not sampled)
        from loop to tokenize: the encode CPU per request (measured by re-running the same
        encodes in the bench process) times the share of the sampled encodes (their Python part)
        taken on the loop thread, at most the loop thread's CPU outside the GIL."""
        on_loop = sum(n for (name, stack), n in self.stacks.items() if name == "MainThread" and _encodes(stack))
        everywhere = sum(n for (_name, stack), n in self.stacks.items() if _encodes(stack))
        share = on_loop / everywhere if everywhere else 0.0
        moved = min(self.main_residual_s, share * encode_s_per_req * self.requests_profiled)
        self.inline_encode_share = share
        self.stage_s["loop"] -= moved
        self.func_s[LOOP_RESIDUAL] -= moved
        self.stage_s["tokenize"] += moved
        self.func_s[("tokenize", "[HF tokenizers encode on the loop thread, GIL released (calibrated)]")] += moved

    @staticmethod
    def _med(xs: list[float]) -> dict[str, Any]:
        return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "rounds": xs}

    def summary(self) -> dict[str, Any]:
        cpu = self._med([p.cpu_ms_per_req for p in self.measured])
        total = sum(self.stage_s.values()) or 1.0
        shares = {k: 100.0 * self.stage_s.get(k, 0.0) / total for k in STAGES}
        per_req_us = 1000 * cpu["median"] / total  # µs per request for one second of profiled CPU
        events = sum(p.events for p in self.measured) / max(1, sum(p.requests for p in self.measured))
        by_stage: dict[str, list[dict[str, Any]]] = {k: [] for k in STAGES}
        ranked = sorted(self.func_s.items(), key=lambda kv: -kv[1])
        for (st, fn), s in ranked:
            if len(by_stage[st]) < 8:
                by_stage[st].append({"function": fn, "pct": 100 * s / total})
        return {
            "name": self.scenario.name,
            "prompt_tokens": self.tokens,
            "cpu_ms_per_req": cpu,
            "requests_per_s": self._med([p.rps for p in self.measured]),
            "profiled_cpu_ms_per_req": [p.cpu_ms_per_req for p in self.profiled],
            "main_thread_ms_per_req": [p.cpu.main.run_s * 1e3 / p.requests for p in self.measured],
            "sse_events_per_req": events,
            "kv_events_per_req": sum(p.kv_events for p in self.measured) / max(1, sum(p.requests for p in self.measured)),
            "errors": sum(p.errors for p in self.measured + self.profiled),
            "samples": self.samples,
            "loop_thread_sampling": self.quality,
            "encode_us_per_req_measured_here": self.encode_us_per_req,
            "inline_encode_share": self.inline_encode_share,
            "share_pct": shares,
            "stage_ms_per_req": {k: cpu["median"] * v / 100 for k, v in shares.items()},
            "top_self": [{"function": fn, "stage": st, "self_pct": 100 * s / total, "cpu_us_per_req": s * per_req_us} for (st, fn), s in ranked[:25]],
            "top_by_stage": by_stage,
            "suspects_us_per_req": {k: self.suspect_s.get(k, 0.0) * per_req_us for k in SUSPECTS},
        }


#: functions worth a number of their own: (regex on "func (file)", inclusive?). Inclusive: a
#: sample counts when any of its frames matches; else only its innermost frame is looked at.
SUSPECTS: dict[str, tuple[str, bool]] = {
    "Fleet.models/resolve_model": (r"(^|\.)(models|resolve_model) \(gateway/fleet\.py\)", True),
    "Prometheus .labels()": (r"(^|\.)labels \(prometheus_client/", True),
    "Prometheus, all per-request calls": (r"\(prometheus_client/(?!parser)", True),
    "DisconnectWatch (task per request)": (r"^DisconnectWatch\.", True),
    "tokenize pool hop (self)": (
        r"(^|\.)(run \(kvindex/tokenize|wrap_future|_chain_future|_call_set_state|_copy_future_state|_set_state|submit|_worker|_adjust_thread_count|release|acquire|get|put) \((kvindex/tokenize|asyncio/futures|concurrent/|threading|queue)",
        False,
    ),
    "token cache key (json.dumps of the chat)": (r"\(json/", True),
    "forward_headers + relay_headers": (r"(^|\.)(forward_headers|relay_headers) \(gateway/proxy\.py\)", True),
    "upstream protocol callbacks": (
        r"^UpstreamProtocol\.(data_received|on_body|on_header|on_headers_complete|on_message_complete) \(gateway/proxy\.py\)",
        True,
    ),
    "request id (uuid4)": (r"^uuid4 \(uuid\.py\)", True),
}


def machine() -> str:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return f"{os.cpu_count()} cores ({cpu or platform.machine()}), Linux {platform.release()}, Python {platform.python_version()}"


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@dataclass
class Side:
    """One gateway under test: its source tree, its process, its profiler and its results."""

    label: str
    root: Path
    stack: Stack
    results: dict[str, ScenarioResult]
    profiler: PySpy | CProfileSwitch | None = None
    niceness: int = 0
    policy: str = "SCHED_OTHER"
    idle_ms_per_s: float = 0.0


def open_side(label: str, root: Path, tmp: Path, replicas: list[Replica], args: argparse.Namespace, clf: Classifier) -> Side:
    """Start a gateway from ``root`` in front of ``replicas`` with its profiler (py-spy, else
    the gateway restarted under cProfile; none with ``--no-profile``)."""
    env = dict(args.env) if label == "main" else {}
    stack = Stack(tmp / label, root, replicas, cprofile=args.profile and args.profiler == "cprofile", nice=args.nice, extra=args.config, env=env)
    results = {sc.name: ScenarioResult(sc) for sc in SCENARIOS if not args.scenarios or sc.name in args.scenarios}
    try:
        why = None if not args.profile or args.profiler == "cprofile" else PySpy.unavailable(stack.pid, stack.tmp)
        if why is not None:
            print(f"py-spy unavailable ({why}); restarting the {label} gateway under cProfile", flush=True)
            stack.stop()
            stack = Stack(tmp / label, root, replicas, cprofile=True, nice=args.nice, extra=args.config, env=env)
        side = Side(label, root, stack, results, niceness=stack.niceness(), policy=stack.make_realtime(args.rt_prio))
        if not args.profile:
            side.profiler = None
        elif stack.cprofile_out is not None:
            side.profiler = CProfileSwitch(stack.pid, stack.cprofile_out, clf)
        else:
            side.profiler = PySpy(stack.pid, args.rate, stack.tmp, rt_prio=args.rt_prio + 10 if side.policy.startswith("SCHED_FIFO") else 0)
    except BaseException:
        stack.stop()
        raise
    return side


def run(args: argparse.Namespace) -> dict[str, Any]:
    n = args.requests
    clf = Classifier()
    prompts = Prompts()
    load_start = loadavg()
    print(f"machine: {machine()}", flush=True)
    print(f"load average at start: {load_start}", flush=True)
    roots = [("main", args.root)] + ([("compare", args.compare_root)] if args.compare_root else [])
    sides: list[Side] = []
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as td:
        tmp = Path(td)
        replicas = start_replicas(args.replicas, args.time_scale)
        try:
            for label, root in roots:
                sides.append(open_side(label, root, tmp, replicas, args, clf))
            for side in sides:
                prof = side.profiler.name if side.profiler is not None else "none (--no-profile)"
                print(f"{side.label} gateway ({side.root}): profiler {prof}; nice {side.niceness}, its event loop thread {side.policy}", flush=True)
            scenarios = list(sides[0].results)
            passes = "measured + profiled pass" if args.profile else "measured pass"
            print(
                f"{len(scenarios)} scenarios x {args.rounds} rounds x {len(sides)} gateways x ({passes}) x {n} requests, concurrency {args.concurrency}",
                flush=True,
            )
            # idle cost (health probes, scrapes): part of every figure below, shown for scale
            for side in sides:
                clock = CpuClock(side.stack.pid)
                time.sleep(args.idle_s)
                side.idle_ms_per_s = clock.read().total_s * 1e3 / args.idle_s
            # warm-up: every scenario once per gateway (templates compiled, connections pooled, documents cached)
            for name in scenarios:
                sc = sides[0].results[name].scenario
                bodies = [prompts.body(sc, args.max_tokens) for _ in range(max(16, n // 5))]
                tokens = prompt_tokens(sc, bodies[:50])
                encode_us = 1e6 * encode_cpu_s(sc, bodies[:100])
                for side in sides:
                    res = side.results[name]
                    res.tokens, res.encode_us_per_req = tokens, encode_us
                    warm = asyncio.run(drive(side.stack.url, sc, bodies, args.concurrency, side.stack.pid))
                    if warm.errors:
                        raise RuntimeError(f"{side.label}: {sc.name}: {warm.errors} of {warm.requests} warm-up requests failed")
            for rnd in range(args.rounds):
                for name in scenarios:
                    # the gateways take turns going first, so neither always runs on a fresher machine
                    for side in sides if rnd % 2 == 0 else sides[::-1]:
                        run_pass(side, side.results[name], rnd, args, prompts, clf)
        except BaseException:
            for side in sides:
                with contextlib.suppress(OSError):
                    print(f"{side.label} gateway log tail:\n{side.stack.log.read_text(errors='replace')[-2000:]}", file=sys.stderr)
            raise
        finally:
            for side in sides:
                side.stack.stop()
            for r in replicas:
                r.stop()
    load_end = loadavg()
    print(f"load average at end: {load_end}", flush=True)
    reports = [side_report(side, args) for side in sides]
    rep = {
        "machine": machine(),
        "load_average_start": load_start,
        "load_average_end": load_end,
        "requests_per_pass": n,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "time_scale": args.time_scale,
        "gateway_config_extra": args.config,
        "main_gateway_env": dict(args.env),
        "stages": STAGES,
        **reports[0],  # the main gateway's figures at the top level, as before --compare-root
        "sides": reports,
    }
    if len(sides) == 2:
        rep["comparison"] = compare(sides[0], sides[1])
    return rep


def run_pass(side: Side, res: ScenarioResult, rnd: int, args: argparse.Namespace, prompts: Prompts, clf: Classifier) -> None:
    """One measured pass of one scenario on one gateway, then (unless ``--no-profile``) a profiled one."""
    sc, n, stack, profiler = res.scenario, args.requests, side.stack, side.profiler
    kv0 = kv_events_applied(stack.url)
    m = asyncio.run(drive(stack.url, sc, [prompts.body(sc, args.max_tokens) for _ in range(n)], args.concurrency, stack.pid))
    m.kv_events = kv_events_applied(stack.url) - kv0
    res.measured.append(m)
    line = f"  round {rnd + 1}/{args.rounds}  {side.label:<8} {sc.name:<24} {m.cpu_ms_per_req:6.3f} CPU ms/req {m.rps:6.0f} req/s"
    errors = m.errors
    if profiler is not None:
        bodies = [prompts.body(sc, args.max_tokens) for _ in range(n)]
        python_threads = profiler.python_threads() if isinstance(profiler, PySpy) else {}
        profiler.start()
        try:
            p = asyncio.run(drive(stack.url, sc, bodies, args.concurrency, stack.pid))
        finally:
            prof = profiler.stop()
        res.profiled.append(p)
        res.add_profile(prof, p, clf, args.rate if isinstance(profiler, PySpy) else None, python_threads)
        errors += p.errors
        line += f"   profiled: {p.cpu_ms_per_req:6.3f} CPU ms/req, {prof.samples:.0f} samples"
        if res.quality:
            q = res.quality[-1]
            line += f"; loop thread: {100 * q['loop_gil_share']:.0f}% of its CPU with the GIL, runqueue wait {100 * q['loop_wait_per_cpu']:.0f}% of its CPU"
    if errors:
        print(f"  warning: {side.label}: {sc.name}: {errors} failed requests", flush=True)
    print(line, flush=True)


def side_report(side: Side, args: argparse.Namespace) -> dict[str, Any]:
    """One gateway's figures (stacks written to ``--stacks``, under ``compare/`` for the second)."""
    if isinstance(side.profiler, PySpy):
        for res in side.results.values():
            res.split_inline_encode(res.encode_us_per_req / 1e6)
    if args.stacks and side.profiler is not None:
        where = args.stacks if side.label == "main" else args.stacks / side.label
        where.mkdir(parents=True, exist_ok=True)
        for res in side.results.values():
            text = "".join(f"{';'.join([f'thread {name}', *(fr.label for fr in stack)])} {k}\n" for (name, stack), k in res.stacks.most_common())
            (where / (res.scenario.name.replace(" ", "_") + ".txt")).write_text(text)
    return {
        "label": side.label,
        "root": str(side.root),
        "profiler": side.profiler.name if side.profiler is not None else "none (--no-profile)",
        "idle_cpu_ms_per_s": side.idle_ms_per_s,
        "gateway_nice": side.niceness,
        "gateway_loop_thread_policy": side.policy,
        "scenarios": [res.summary() for res in side.results.values()],
    }


def compare(main: Side, other: Side) -> list[dict[str, Any]]:
    """Per scenario: main / compare CPU ms per request, round by round (the passes of a round
    ran back to back), and the median ratio."""
    out = []
    for name, res in main.results.items():
        ratios = [a.cpu_ms_per_req / b.cpu_ms_per_req for a, b in zip(res.measured, other.results[name].measured, strict=True) if b.cpu_ms_per_req]
        out.append(
            {
                "name": name,
                "main_cpu_ms_per_req": statistics.median(p.cpu_ms_per_req for p in res.measured),
                "compare_cpu_ms_per_req": statistics.median(p.cpu_ms_per_req for p in other.results[name].measured),
                "ratio": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": ratios} if ratios else None,
            }
        )
    return out


def print_report(rep: dict[str, Any], top_for: list[str]) -> None:
    print()
    print(f"machine: {rep['machine']}; load average {rep['load_average_start']} at start, {rep['load_average_end']} at end")
    print(
        f"{rep['rounds']} rounds x {rep['requests_per_pass']} requests per pass, concurrency {rep['concurrency']}, "
        f"max_tokens {rep['max_tokens']}, replicas at time scale {rep.get('time_scale', 0.0):g}"
    )
    if rep.get("gateway_config_extra"):
        print(f"gateway config added: {json.dumps(rep['gateway_config_extra'])}")
    if rep.get("main_gateway_env"):
        print(f"main gateway's environment added: {json.dumps(rep['main_gateway_env'])}")
    for side in rep.get("sides", [rep]):
        print_side(side, top_for, several="sides" in rep and len(rep["sides"]) > 1)
    if rep.get("comparison"):
        main, other = rep["sides"][0]["root"], rep["sides"][1]["root"]
        print()
        print(f"main ({main}) against compare ({other}): CPU ms/request, medians over rounds; ratio = main / compare, per round (passes back to back)")
        print()
        print("| scenario | main | compare | ratio median (min–max) |")
        print("|---|---|---|---|")
        for c in rep["comparison"]:
            r = c["ratio"]
            ratio = f"{r['median']:.3f} ({r['min']:.3f}–{r['max']:.3f})" if r else "-"
            print(f"| {c['name']} | {c['main_cpu_ms_per_req']:.3f} | {c['compare_cpu_ms_per_req']:.3f} | {ratio} |")


def print_side(rep: dict[str, Any], top_for: list[str], several: bool = False) -> None:
    """One gateway's tables: CPU per request by stage, top functions, profile quality, suspects."""
    stages = list(STAGES)
    print()
    if several:
        print(f"## {rep['label']} gateway: {rep['root']}")
        print()
    print(f"profiler: {rep['profiler']}; idle gateway: {rep['idle_cpu_ms_per_s']:.1f} CPU ms/s (probes, scrapes: the background column)")
    print()
    print("| scenario | prompt tokens | CPU ms/request (min–max) | " + " | ".join(stages) + " | requests/s | relay µs/SSE event |")
    print("|---|---|---|" + "---|" * len(stages) + "---|---|")
    for s in rep["scenarios"]:
        c, r = s["cpu_ms_per_req"], s["requests_per_s"]
        shares = " | ".join(f"{s['share_pct'][k]:.1f}" for k in stages)
        ev = s["sse_events_per_req"]
        relay = f"{1000 * s['stage_ms_per_req']['relay'] / ev:.1f}" if ev and s["samples"] else "-"
        print(
            f"| {s['name']} | {s['prompt_tokens']:.0f} | {c['median']:.3f} ({c['min']:.3f}–{c['max']:.3f}) | {shares} "
            f"| {r['median']:.0f} ({r['min']:.0f}–{r['max']:.0f}) | {relay} |"
        )
    print()
    print("stage columns: % of the gateway's CPU. " + "; ".join(f"{k}: {v}" for k, v in STAGES.items()))
    if not any(s["samples"] for s in rep["scenarios"]):
        return
    for s in rep["scenarios"]:
        if s["name"] not in top_for:
            continue
        print()
        print(f"top 15 functions by self time, {s['name']} ({s['samples']:.0f} samples):")
        print()
        print("| function | stage | self % | CPU µs/request |")
        print("|---|---|---|---|")
        for t in s["top_self"][:15]:
            print(f"| `{t['function']}` | {t['stage']} | {t['self_pct']:.1f} | {t['cpu_us_per_req']:.1f} |")
    print()
    print("per scenario: what a request carries, and how the profile held up")
    print()
    print("| scenario | SSE events/req | KV events/req | CPU ms/req while profiled | loop thread CPU with the GIL (sampled) | its runqueue wait | samples |")
    print("|---|---|---|---|---|---|---|")
    for s in rep["scenarios"]:
        q = s["loop_thread_sampling"]
        gil = f"{100 * statistics.median(x['loop_gil_share'] for x in q):.0f}%" if q else "-"
        wait = f"{100 * statistics.median(x['loop_wait_per_cpu'] for x in q):.0f}%" if q else "-"
        prof = f"{statistics.median(s['profiled_cpu_ms_per_req']):.3f}" if s["profiled_cpu_ms_per_req"] else "-"
        print(f"| {s['name']} | {s['sse_events_per_req']:.1f} | {s['kv_events_per_req']:.1f} | {prof} | {gil} | {wait} | {s['samples']:.0f} |")
    print()
    print("named suspects, CPU µs/request (inclusive: everything below them):")
    print()
    names = list(SUSPECTS)
    print("| scenario | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for s in rep["scenarios"]:
        print(f"| {s['name']} | " + " | ".join(f"{s['suspects_us_per_req'][k]:.1f}" for k in names) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=None, help="requests per pass (default 1500; --quick 300)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds, each a measured and a profiled pass per scenario (default 3)")
    ap.add_argument("--quick", action="store_true", help="fewer requests per pass")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (a stream carries one SSE event per token)")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument(
        "--time-scale",
        type=float,
        default=0.0,
        help="the replicas' time scale: 0 answers at once (the gateway's cost per request, nothing else); 1 paces decode steps as a GPU would, "
        "so a stream's events arrive one step apart, each relayed on its own wake-up, and KV events one batch per step",
    )
    ap.add_argument("--rate", type=int, default=400, help="py-spy samples per second")
    ap.add_argument(
        "--nice",
        type=int,
        default=-10,
        help="the gateway's nice value (root): it then waits little for a CPU, so py-spy's runnable samples are on-CPU samples (0: as is)",
    )
    ap.add_argument(
        "--rt-prio",
        type=int,
        default=10,
        help="SCHED_FIFO priority of the gateway's event-loop thread (root), so it never queues for a CPU (0: off)",
    )
    ap.add_argument("--idle-s", type=float, default=3.0, help="seconds of idle gateway CPU measured before the load")
    ap.add_argument("--profiler", choices=["auto", "cprofile"], default="auto", help="auto: py-spy, cProfile if py-spy cannot attach")
    ap.add_argument("--scenarios", type=lambda s: [x.strip() for x in s.split(",")], default=None, help="comma-separated scenario names (default: all)")
    ap.add_argument(
        "--config",
        type=json.loads,
        default=None,
        help='top-level sections added to the gateway\'s config, as JSON (a what-if: \'{"tokenize": {"inline_max_bytes": 4096}}\')',
    )
    ap.add_argument("--root", type=Path, default=ROOT, help="source tree of the gateway to run (e.g. a git archive of another commit)")
    ap.add_argument(
        "--compare-root",
        type=Path,
        default=None,
        help="a second gateway from this source tree, in front of the same replicas: every pass runs on both, back to back (who goes first alternates "
        "by round); the report adds main/compare CPU ratios per round",
    )
    ap.add_argument(
        "--env",
        type=lambda kv: tuple(kv.split("=", 1)),
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable for the main gateway only (repeatable): a what-if against --compare-root",
    )
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="measured passes only (CPU per request, no stage split): quicker A/B runs")
    ap.add_argument("--json", type=Path, help="write every figure (per round, per stage, top functions) here")
    ap.add_argument("--stacks", type=Path, help="keep each scenario's collapsed stacks here (flamegraph.pl / speedscope input)")
    args = ap.parse_args(argv)
    if args.requests is None:
        args.requests = 300 if args.quick else 1500
    if args.rounds is None:
        args.rounds = 3
    if args.scenarios:
        unknown = set(args.scenarios) - {sc.name for sc in SCENARIOS}
        if unknown:
            ap.error(f"unknown scenarios {sorted(unknown)}; known: {[sc.name for sc in SCENARIOS]}")
    rep = run(args)
    print_report(rep, ["long chat stream", "long completions stream"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
