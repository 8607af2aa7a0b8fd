#!/usr/bin/env python3
"""Places an order with 100 bad lines through Python grpcio (C-core, with its default header size
limits) and prints what a standard client sees: the status code, its message, and the size of the
error details it received. The request message is built from the server's reflected descriptors.

Usage: bad_order.py HOST:PORT
"""

import json
import sys

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main():
    address = sys.argv[1]
    with grpc.insecure_channel(address) as channel:
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        request_type = message_factory.GetMessageClass(
            pool.FindMessageTypeByName("orderflow.v1.PlaceOrderRequest")
        )
        response_type = message_factory.GetMessageClass(
            pool.FindMessageTypeByName("orderflow.v1.PlaceOrderResponse")
        )
        request = request_type(customer_id="")
        for _ in range(100):
            request.lines.add(sku="", quantity=0)
        place = channel.unary_unary(
            "/orderflow.v1.OrderReceiver/PlaceOrder",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        try:
            place(request, timeout=10)
            out = {"code": "OK"}
        except grpc.RpcError as e:
            details = dict(e.trailing_metadata() or ()).get("grpc-status-details-bin", b"")
            out = {
                "code": e.code().name,
                "message": e.details(),
                "details_bytes": len(details),
            }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
