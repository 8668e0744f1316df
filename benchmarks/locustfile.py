"""Locust user speaking the OpenAI API with kvgate's benchmark workloads.

Locust times a streamed request only until the response headers, so each request also fires a
custom "TTFT" event (time to the first content chunk) and an "ITL" event per later chunk.

    locust -f benchmarks/locustfile.py --headless -u 16 -r 4 -t 60s --host http://127.0.0.1:8000
    KVGATE_WORKLOAD=multi-turn locust -f benchmarks/locustfile.py ...
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, task

from benchmarks.workloads import MODEL, WORKLOADS

_WORKLOAD = WORKLOADS[os.environ.get("KVGATE_WORKLOAD", "shared-prefix")]()


class OpenAIUser(HttpUser):
    wait_time = between(0.0, 0.2)

    def on_start(self) -> None:
        self.rng = random.Random(id(self))

    @task
    def session(self) -> None:
        s = self.rng.choice(_WORKLOAD.sessions)
        history = [{"role": "system", "content": s.system}]
        for q in s.questions:
            msgs = [*history, {"role": "user", "content": q}]
            answer = self._chat(msgs, s.max_tokens)
            if s.grow:
                history = [*msgs, {"role": "assistant", "content": answer or "ok"}]

    def _chat(self, messages: list[dict], max_tokens: int) -> str:
        body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        last: float | None = None  # time of the previous content chunk
        text: list[str] = []
        with self.client.post("/v1/chat/completions", json=body, stream=True, catch_response=True, name="chat (headers)") as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return ""
            for line in resp.iter_lines():
                if not line or not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                choices = chunk.get("choices") or []
                if choices and choices[0].get("delta", {}).get("content"):
                    now = time.perf_counter()
                    if last is None:
                        self._event("TTFT", (now - t0) * 1000)
                    else:
                        self._event("ITL", (now - last) * 1000)
                    last = now
                    text.append(choices[0]["delta"]["content"])
            resp.success()
        return "".join(text)

    def _event(self, name: str, ms: float) -> None:
        self.environment.events.request.fire(request_type="STREAM", name=name, response_time=ms, response_length=0, exception=None, context={})
