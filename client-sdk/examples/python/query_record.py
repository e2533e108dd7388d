#!/usr/bin/env python3
"""Look up records of a resource through your department's exchange node, with stock grpcio.

Generates the Python stubs from the repository's proto/ directory at run time (grpc_tools.protoc, into
a temporary directory), connects over mutual TLS with your application's certificate and calls
govexchange.v1.ExchangeNode/QueryRecords. Prints the answer as one JSON document on stdout.

Exit status: 0 on success; 2 when the call fails with a gRPC error (code and message are printed on
stderr, and as {"error": {...}} on stdout); 1 when something fails here (files, stub generation);
64 for a bad command line.
"""
import argparse
import importlib
import importlib.resources
import json
import os
import sys
import tempfile
from pathlib import Path

EXIT_GRPC_ERROR = 2
EXIT_LOCAL_ERROR = 1
EXIT_USAGE = 64

# client-sdk/examples/python/query_record.py -> the repository root is three folders up.
DEFAULT_PROTO_DIR = Path(__file__).resolve().parents[3] / "proto" / "proto"


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits 2 by default; 2 is reserved for gRPC errors here
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def parse_args(argv):
    env = os.environ.get
    p = Parser(
        description="Query records through your department's exchange node (ExchangeNode/QueryRecords).",
        epilog="Exit status: 0 ok, 2 gRPC error, 1 local failure, 64 bad arguments.",
    )
    p.add_argument("--node", default=env("EXCHANGE_NODE", "127.0.0.1:7401"),
                   help="your department's node, HOST:PORT (env EXCHANGE_NODE; default %(default)s)")
    p.add_argument("--ca", default=env("EXCHANGE_CA"), required=not env("EXCHANGE_CA"),
                   help="CA certificate, PEM (env EXCHANGE_CA)")
    p.add_argument("--cert", default=env("EXCHANGE_CERT"), required=not env("EXCHANGE_CERT"),
                   help="your application's certificate, PEM (env EXCHANGE_CERT)")
    p.add_argument("--key", default=env("EXCHANGE_KEY"), required=not env("EXCHANGE_KEY"),
                   help="your application's private key, PEM (env EXCHANGE_KEY)")
    p.add_argument("--resource", required=True, help="resource code, e.g. 101001/000001")
    p.add_argument("--key-value", action="append", default=[], metavar="KEY",
                   help="record key (统一社会信用代码, 公民身份号码...); repeatable, or give keys as arguments")
    p.add_argument("keys", nargs="*", metavar="KEY", help="record keys")
    p.add_argument("--purpose", default="", help="why you ask (recorded in both departments' audit trails)")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds (default %(default)s)")
    p.add_argument("--proto-dir", type=Path, default=Path(env("GX_PROTO_DIR", DEFAULT_PROTO_DIR)),
                   help="folder holding govexchange/v1/*.proto (env GX_PROTO_DIR; default: this repository's)")
    args = p.parse_args(argv)
    args.all_keys = args.key_value + args.keys
    if not args.all_keys:
        p.error("give at least one record key (--key-value KEY or as an argument)")
    return args


def generate_stubs(proto_dir: Path, out_dir: Path):
    """Compiles govexchange/v1/*.proto into out_dir and returns the node_pb2 and node_pb2_grpc modules."""
    from grpc_tools import protoc

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    protos = sorted(str(p.relative_to(proto_dir)) for p in (proto_dir / "govexchange" / "v1").glob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {proto_dir / 'govexchange' / 'v1'}")
    rc = protoc.main([
        "grpc_tools.protoc",
        f"--proto_path={proto_dir}",
        f"--proto_path={well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ])
    if rc != 0:
        raise RuntimeError(f"protoc failed with status {rc}")
    sys.path.insert(0, str(out_dir))
    return importlib.import_module("govexchange.v1.node_pb2"), importlib.import_module("govexchange.v1.node_pb2_grpc")


def response_json(resource, keys, resp):
    """The same shape as `exchangectl records get --json`."""
    missing = set(resp.not_found)
    return {
        "resource_code": resource,
        "message_id": resp.message_id,
        "provider_code": resp.provider_code,
        "records": [
            {"key": r.key, "items": dict(sorted(r.items.items())), "updated_at_unix_ms": r.updated_at_unix_ms}
            for r in resp.records
        ],
        "not_found": list(resp.not_found),
        "not_found_keys": [k for i, k in enumerate(keys) if i in missing],
        "data_items": list(resp.data_items),
        "masked_items": list(resp.masked_items),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import grpc

        creds = grpc.ssl_channel_credentials(
            root_certificates=Path(args.ca).read_bytes(),
            private_key=Path(args.key).read_bytes(),
            certificate_chain=Path(args.cert).read_bytes(),
        )
    except (OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_LOCAL_ERROR

    with tempfile.TemporaryDirectory(prefix="gx-stubs-") as out_dir:
        try:
            node_pb2, node_pb2_grpc = generate_stubs(args.proto_dir, Path(out_dir))
        except (RuntimeError, ImportError, OSError) as e:
            print(f"error: generating stubs from {args.proto_dir}: {e}", file=sys.stderr)
            return EXIT_LOCAL_ERROR

        # The node's certificate names its address (DNS or IP SAN): the target is checked as given.
        with grpc.secure_channel(args.node, creds) as channel:
            stub = node_pb2_grpc.ExchangeNodeStub(channel)
            request = node_pb2.QueryRecordsRequest(resource_code=args.resource, keys=args.all_keys, purpose=args.purpose)
            try:
                resp = stub.QueryRecords(request, timeout=args.timeout)
            except grpc.RpcError as e:
                code, message = e.code().name, e.details() or ""
                print(json.dumps({"error": {"code": code, "message": message}}, ensure_ascii=False))
                print(f"error: {code}: {message}", file=sys.stderr)
                return EXIT_GRPC_ERROR

    print(json.dumps(response_json(args.resource, args.all_keys, resp), ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
