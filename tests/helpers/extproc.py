"""Builders for ext_proc messages and a message-by-message gRPC conversation with the picker."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import msgspec
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from tests.helpers.gateway import MODEL

M = processing_mode_pb2.ProcessingMode


def headers_msg(path="/v1/completions", *, eos=False, request_mode=M.BUFFERED, response_mode=M.NONE, request_id="t-1", extra=()) -> pb.ProcessingRequest:
    hs = [(":path", path), (":method", "GET" if eos else "POST"), ("x-request-id", request_id), *extra]
    return pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in hs]), end_of_stream=eos
        ),
        protocol_config=pb.ProtocolConfiguration(request_body_mode=request_mode, response_body_mode=response_mode),
    )


def body_msg(data: bytes, eos: bool, response=False, metadata: dict | None = None) -> pb.ProcessingRequest:
    req = pb.ProcessingRequest(**{"response_body" if response else "request_body": pb.HttpBody(body=data, end_of_stream=eos)})
    set_metadata(req, metadata)
    return req


def response_headers_msg(status: int, *, eos=False, metadata: dict | None = None) -> pb.ProcessingRequest:
    req = pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=":status", raw_value=str(status).encode())]), end_of_stream=eos
        )
    )
    set_metadata(req, metadata)
    return req


def set_metadata(req: pb.ProcessingRequest, metadata: dict | None) -> None:
    for ns, fields in (metadata or {}).items():
        req.metadata_context.filter_metadata[ns].update(fields)


def prompt_bytes(text: str, **extra) -> bytes:
    return msgspec.json.encode({"model": MODEL, "prompt": text, "max_tokens": 2, **extra})


class Conversation:
    """One Process stream: send a message, collect exactly the answers it produced."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def __aenter__(self) -> Conversation:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.inbox: asyncio.Queue = asyncio.Queue()

        async def requests():
            while (m := await self.outbox.get()) is not None:
                yield m

        self.call = pb_grpc.ExternalProcessorStub(self.channel).Process(requests())

        async def reader():
            async for r in self.call:
                await self.inbox.put(r)
            await self.inbox.put(None)

        self.reader = asyncio.ensure_future(reader())
        return self

    async def send(self, req: pb.ProcessingRequest, expect: int, *, then_end: bool = False) -> list[pb.ProcessingResponse]:
        await self.outbox.put(req)
        out = [await asyncio.wait_for(self.inbox.get(), 10) for _ in range(expect)]
        assert all(r is not None for r in out), "stream ended early"
        if then_end:  # the picker closes the stream after this answer
            assert await asyncio.wait_for(self.inbox.get(), 5) is None
            return out
        with contextlib.suppress(asyncio.TimeoutError):
            extra = await asyncio.wait_for(self.inbox.get(), 0.15)
            pytest.fail(f"unexpected extra answer: {extra}")
        return out

    async def close(self) -> None:
        await self.outbox.put(None)
        assert await asyncio.wait_for(self.inbox.get(), 10) is None

    async def __aexit__(self, *exc) -> None:
        self.reader.cancel()
        await self.channel.close()
