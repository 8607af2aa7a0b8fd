#!/usr/bin/env python3
"""Asks a running orderflow stage what grpcurl would: its services through server reflection (v1 and
v1alpha), the methods of its orderflow services (resolved from the reflected descriptors), and its
health through grpc.health.v1. Prints one JSON object.

Usage: reflect.py HOST:PORT
"""

import json
import sys

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

# v1 and v1alpha reflection messages are identical on the wire; grpcio-reflection ships the v1alpha
# stubs only, so v1 is called by its method path with the same messages.
REFLECTION_METHODS = {
    "v1": "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "v1alpha": "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
}


def list_services(channel, method):
    call = channel.stream_stream(
        method,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    names = []
    for response in call(iter([request]), timeout=10):
        if response.HasField("error_response"):
            raise RuntimeError(response.error_response.error_message)
        names.extend(s.name for s in response.list_services_response.service)
    return sorted(names)


def check(health, name):
    try:
        response = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
    except grpc.RpcError as e:
        return f"error {e.code().name}: {e.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main():
    address = sys.argv[1]
    with grpc.insecure_channel(address) as channel:
        out = {name: list_services(channel, path) for name, path in REFLECTION_METHODS.items()}
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        ours = [s for s in out["v1alpha"] if s.startswith("orderflow.")]
        out["methods"] = {
            s: sorted(m.name for m in pool.FindServiceByName(s).methods) for s in ours
        }
        health = health_pb2_grpc.HealthStub(channel)
        out["health"] = {name: check(health, name) for name in [""] + ours}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
