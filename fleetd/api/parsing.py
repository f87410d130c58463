"""Request parsing at the edge: a malformed request body gets INVALID_ARGUMENT, not UNKNOWN.

grpcio deserializes a request before any handler runs; bytes that do not parse as the
request message make it answer UNKNOWN ("Exception deserializing request!") without the
service ever seeing the call. `ParseRequests` is a server interceptor that swaps every
handler's deserializer for the identity and parses inside the handler instead, so a body
that is not a valid `fleetd.v1.PlaceRequest` (or any other request type: health and
reflection included) is answered INVALID_ARGUMENT naming the message type.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError

#: Called with (full method name, seconds spent) for every malformed request.
OnMalformed = Callable[[str, float], None]


class MalformedRequest(Exception):
    """The request body does not parse as the method's request message."""


def _message_type(method: str) -> str:
    """`/pkg.Service/Method` -> the full name of its request message ('' when unknown)."""
    try:
        service, name = method.lstrip("/").rsplit("/", 1)
        desc = descriptor_pool.Default().FindServiceByName(service)
        return str(desc.methods_by_name[name].input_type.full_name)
    except (KeyError, ValueError):
        return ""


def _parse(deserializer: Callable[[bytes], Any] | None, raw: bytes, type_name: str) -> Any:
    if deserializer is None:
        return raw
    try:
        return deserializer(raw)
    except (DecodeError, ValueError, TypeError) as exc:  # upb raises DecodeError
        what = type_name or "the request message"
        raise MalformedRequest(f"request body is not a valid {what}: {exc}") from exc


class ParseRequests(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Parse requests inside the handler: malformed bodies -> INVALID_ARGUMENT (see module)."""

    def __init__(self, on_malformed: OnMalformed | None = None) -> None:
        """`on_malformed(method, seconds)` is told about every refused body (metrics)."""
        self._on_malformed = on_malformed
        self._cache: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """The handler of `handler_call_details.method`, rewrapped to parse its own request."""
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        cached = self._cache.get(method)
        if cached is None:
            cached = self._cache[method] = self._wrap(method, handler)
        return cached

    async def _abort(
        self, method: str, context: grpc.aio.ServicerContext, exc: MalformedRequest, start: float
    ) -> None:
        if self._on_malformed is not None:
            self._on_malformed(method, time.perf_counter() - start)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def _wrap(self, method: str, h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        type_name = _message_type(method)
        deserializer = h.request_deserializer
        serializer = h.response_serializer
        abort = self._abort

        async def parse_one(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            try:
                return _parse(deserializer, raw, type_name)
            except MalformedRequest as exc:
                await abort(method, context, exc, start)

        async def parse_stream(
            raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            async for raw in raws:
                yield await parse_one(raw, context)

        if h.unary_unary is not None:
            inner_uu = h.unary_unary

            async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
                return await _call(inner_uu, await parse_one(raw, context), context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=serializer)
        if h.unary_stream is not None:
            inner_us = h.unary_stream
            if inspect.isasyncgenfunction(inner_us):

                async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
                    request = await parse_one(raw, context)
                    async for item in inner_us(request, context):
                        yield item

                return grpc.unary_stream_rpc_method_handler(
                    unary_stream, response_serializer=serializer
                )

            # A coroutine that writes its responses with context.write.
            async def unary_stream_writer(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
                return await _call(inner_us, await parse_one(raw, context), context)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream_writer, response_serializer=serializer
            )
        if h.stream_unary is not None:
            inner_su = h.stream_unary

            async def stream_unary(raws: AsyncIterator[bytes], context: Any) -> Any:
                return await _call(inner_su, parse_stream(raws, context), context)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, response_serializer=serializer
            )
        inner_ss = h.stream_stream
        assert inner_ss is not None
        if inspect.isasyncgenfunction(inner_ss):

            async def stream_stream(raws: AsyncIterator[bytes], context: Any) -> Any:
                async for item in inner_ss(parse_stream(raws, context), context):
                    yield item

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, response_serializer=serializer
            )

        async def stream_stream_writer(raws: AsyncIterator[bytes], context: Any) -> Any:
            return await _call(inner_ss, parse_stream(raws, context), context)

        return grpc.stream_stream_rpc_method_handler(
            stream_stream_writer, response_serializer=serializer
        )


async def _call(fn: Callable[..., Any], request: Any, context: grpc.aio.ServicerContext) -> Any:
    result = fn(request, context)
    if inspect.isawaitable(result):
        return await result
    return result
