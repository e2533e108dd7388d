#!/usr/bin/env python3
"""Checks a gov-exchange server with stock gRPC tooling (grpcio, grpcio-health-checking,
grpcio-reflection), over mutual TLS with a client certificate:

- grpc.health.v1.Health/Check for the overall server and for a named service,
- server reflection (v1alpha, what common grpcurl builds speak) lists the services and
  resolves the file that defines one of them.

Usage: stock_grpc_tools.py ADDR CA CERT KEY SERVICE
Prints one JSON document; exits non-zero on any failure.
"""
import json
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


def main() -> int:
    addr, ca, cert, key, service = sys.argv[1:6]
    creds = grpc.ssl_channel_credentials(
        root_certificates=open(ca, "rb").read(),
        private_key=open(key, "rb").read(),
        certificate_chain=open(cert, "rb").read(),
    )
    # The server certificate names localhost and 127.0.0.1; grpcio checks the host name.
    channel = grpc.secure_channel(addr, creds, options=[("grpc.ssl_target_name_override", "localhost")])
    health = health_pb2_grpc.HealthStub(channel)
    overall = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    named = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=service),
    ]
    responses = list(reflection.ServerReflectionInfo(iter(requests), timeout=10))
    services = [s.name for s in responses[0].list_services_response.service]
    files = len(responses[1].file_descriptor_response.file_descriptor_proto)

    result = {
        "overall": health_pb2.HealthCheckResponse.ServingStatus.Name(overall.status),
        "service": health_pb2.HealthCheckResponse.ServingStatus.Name(named.status),
        "services": services,
        "descriptor_files": files,
    }
    print(json.dumps(result))
    ok = result["overall"] == "SERVING" and result["service"] == "SERVING" and service in services and files > 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
