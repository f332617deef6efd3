"""Registering a servicer for every method of its service, from the service's descriptor.

The same as the generated `add_*Servicer_to_server`, except for how request bytes are parsed:
bytes that are not the method's request message reach the handler as `Unparsable`, which it
answers INVALID_ARGUMENT (grpcio itself would answer UNKNOWN "Unexpected DecodeError").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass


class Unparsable:
    """Request bytes that did not parse as `message` (a full protobuf message name)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _parser(message_class: type[Message]) -> Callable[[bytes], Message | Unparsable]:
    parse = message_class.FromString
    name = message_class.DESCRIPTOR.full_name

    def parse_or_flag(data: bytes) -> Message | Unparsable:
        try:
            return parse(data)
        except DecodeError:
            return Unparsable(name)

    return parse_or_flag


def add_servicer(server: grpc.aio.Server, service: ServiceDescriptor, servicer: Any) -> None:
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_parser(GetMessageClass(method.input_type)),
            response_serializer=GetMessageClass(method.output_type).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)  # type: ignore[attr-defined]
