"""Benchmark workloads (seeded, bounded) and the client that runs them through the OpenAI SDK.

* ``shared_prefix``: inference-perf's shape — ``num_groups`` system prompts of
  ``system_prompt_len`` words, each followed by ``num_prompts_per_group`` distinct questions of
  ``question_len`` words, answers of ``output_len`` tokens, groups interleaved at random.
* ``multi_turn``: chat sessions whose context grows turn by turn (each turn resends the history
  with the previous answer), over a few shared system prompts.
* ``long_doc_qa``: a handful of long documents, several questions each.
* ``no_reuse``: every prompt unique — the control where cache-awareness cannot help.

Lengths are in words of the synthetic vocabulary; with the demo tokenizer a word is 1–3 tokens.
Requests stream with ``include_usage``, and each sample records TTFT, inter-token gaps, the
replica-reported cached tokens and the replica that served it (``x-kvgate-replica``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

MODEL = "kvgate/demo-8b"

_SYLL = "ka ri to ne mu sa lo pe di va gu shi an el or ix um et qua zen bro fil mar cor tin".split()


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(_SYLL) for _ in range(rng.randint(1, 3))) for _ in range(n))


@dataclass
class Turn:
    """One request: the messages to send (a session's turns are sent in order)."""

    messages: list[dict]
    max_tokens: int


@dataclass
class Session:
    """Turns sent one after another; ``grow`` appends each answer to the next turn's history."""

    system: str
    questions: list[str]
    max_tokens: int
    grow: bool = False


@dataclass
class Workload:
    name: str
    sessions: list[Session]

    @property
    def requests(self) -> int:
        return sum(len(s.questions) for s in self.sessions)


def shared_prefix(
    num_groups: int = 16, num_prompts_per_group: int = 20, system_prompt_len: int = 1200, question_len: int = 60, output_len: int = 32, seed: int = 1
) -> Workload:
    rng = random.Random(seed)
    systems = [f"[group {g}] " + _words(rng, system_prompt_len) for g in range(num_groups)]
    sessions = [Session(systems[g], [_words(rng, question_len)], output_len) for g in range(num_groups) for _ in range(num_prompts_per_group)]
    rng.shuffle(sessions)
    return Workload("shared-prefix", sessions)


def multi_turn(
    num_sessions: int = 40, turns: int = 8, num_systems: int = 4, system_prompt_len: int = 150, question_len: int = 80, output_len: int = 48, seed: int = 2
) -> Workload:
    rng = random.Random(seed)
    systems = [f"[assistant {s}] " + _words(rng, system_prompt_len) for s in range(num_systems)]
    sessions = [
        Session(systems[i % num_systems] + f" [session {i}]", [_words(rng, question_len) for _ in range(turns)], output_len, grow=True)
        for i in range(num_sessions)
    ]
    rng.shuffle(sessions)
    return Workload("multi-turn", sessions)


def long_doc_qa(num_docs: int = 12, questions_per_doc: int = 20, doc_len: int = 1500, question_len: int = 20, output_len: int = 32, seed: int = 3) -> Workload:
    rng = random.Random(seed)
    docs = [f"[document {d}] " + _words(rng, doc_len) for d in range(num_docs)]
    sessions = [Session(docs[d], [_words(rng, question_len)], output_len) for d in range(num_docs) for _ in range(questions_per_doc)]
    rng.shuffle(sessions)
    return Workload("long-doc-qa", sessions)


def no_reuse(num_requests: int = 128, prompt_len: int = 600, output_len: int = 32, seed: int = 4) -> Workload:
    rng = random.Random(seed)
    return Workload("no-reuse", [Session(f"[unique {i}] " + _words(rng, prompt_len), [_words(rng, 10)], output_len) for i in range(num_requests)])


WORKLOADS: dict[str, Callable[..., Workload]] = {"shared-prefix": shared_prefix, "multi-turn": multi_turn, "long-doc-qa": long_doc_qa, "no-reuse": no_reuse}


@dataclass
class Sample:
    ttft: float
    itl: list[float]
    e2e: float
    output_tokens: int
    prompt_tokens: int
    cached_tokens: int
    replica: str
    error: str | None = None
    start: float = 0.0
    #: the session's system prompt head (which prefix family the request belongs to)
    family: str = ""


@dataclass
class RunResult:
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0
    #: the first ``warmup`` requests by start time fill the caches; summaries leave them out
    warmup: int = 0

    def measured(self) -> list[Sample]:
        """The samples after the warm-up, in start order."""
        return sorted(self.samples, key=lambda s: s.start)[self.warmup :]


async def _one(client, messages: list[dict], max_tokens: int, headers: dict[str, str]) -> tuple[Sample, str]:
    t0 = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    text: list[str] = []
    usage = None
    replica = "?"
    try:
        async with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=messages, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}, extra_headers=headers
        ) as resp:
            replica = resp.headers.get("x-kvgate-replica", headers.get("x-bench-replica", "?"))
            async for chunk in await resp.parse():
                now = time.perf_counter()
                if chunk.choices and chunk.choices[0].delta.content:
                    if first is None:
                        first = now - t0
                    elif last is not None:
                        gaps.append(now - last)
                    last = now
                    text.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    usage = chunk.usage
    except Exception as exc:  # a failed request is a data point, not the end of the run
        return Sample(0.0, [], time.perf_counter() - t0, 0, 0, 0, replica, error=type(exc).__name__, start=t0), ""
    details = getattr(usage, "prompt_tokens_details", None) if usage else None
    cached = (getattr(details, "cached_tokens", 0) or 0) if details else 0
    s = Sample(
        first if first is not None else time.perf_counter() - t0,
        gaps,
        time.perf_counter() - t0,
        usage.completion_tokens if usage else len(text),
        usage.prompt_tokens if usage else 0,
        cached,
        replica,
        start=t0,
    )
    return s, "".join(text)


async def run_workload(
    workload: Workload,
    base_urls: list[str],
    *,
    concurrency: int | None = 16,
    rate: float | None = None,
    seed: int = 0,
    on_done: Callable[[], None] | None = None,
    timeout_s: float = 120.0,
    ramp_s: float = 1.0,
    warmup: int = 0,
) -> RunResult:
    """Closed loop (``concurrency`` sessions at a time) or open loop (Poisson ``rate`` sessions/s).

    With several ``base_urls`` the client itself round-robins over them (the "direct" baseline).
    """
    from openai import AsyncOpenAI

    clients = [AsyncOpenAI(base_url=f"{u}/v1", api_key="bench", max_retries=0, timeout=timeout_s) for u in base_urls]
    result = RunResult(warmup=min(warmup, max(0, workload.requests - 1)))
    rr = 0

    async def session(s: Session) -> None:
        nonlocal rr
        history = [{"role": "system", "content": s.system}]
        for q in s.questions:
            idx = rr % len(clients)
            rr += 1
            headers = {"x-bench-replica": f"direct-{idx}"} if len(clients) > 1 else {}
            msgs = [*history, {"role": "user", "content": q}]
            sample, answer = await _one(clients[idx], msgs, s.max_tokens, headers)
            sample.family = s.system[:40]
            result.samples.append(sample)
            if on_done:
                on_done()
            if s.grow:
                history = [*msgs, {"role": "assistant", "content": answer or "ok"}]

    t0 = time.perf_counter()
    if rate is not None:
        rng = random.Random(seed)
        tasks = []
        for s in workload.sessions:
            tasks.append(asyncio.create_task(session(s)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    else:
        width = concurrency or 1
        sem = asyncio.Semaphore(width)

        async def guarded(i: int, s: Session) -> None:
            if i < width and ramp_s > 0:
                await asyncio.sleep(ramp_s * i / width)  # spawn rate, as Locust ramps users
            async with sem:
                await session(s)

        await asyncio.gather(*(guarded(i, s) for i, s in enumerate(workload.sessions)))
    result.wall_s = time.perf_counter() - t0
    for c in clients:
        await c.close()
    return result
