"""Records OTLP export requests exactly as real exporters send them, for the fuzz seed corpus.

Serves, on loopback only:
  * OTLP/gRPC TraceService/Export (what value-python 0.1.6 uses), recording the request message
    bytes as they came off the wire (no deserializer, so nothing is re-encoded);
  * HTTP: GET /api/v1/agent_instance/info (value-python's initialize_sync asks it) and
    POST /v1/traces (OpenTelemetry's OTLP/HTTP exporter), recording the gunzipped body.

Every request is written to OUT_DIR/captured_<source>_<n>.pb. Ports come from GRPC_PORT and
HTTP_PORT. Run by fuzz/capture/capture.sh; not part of any test.
"""

import gzip
import json
import os
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

OUT_DIR = os.environ["OUT_DIR"]
counter_lock = threading.Lock()
counter = {"value": 0}


def record(source, body):
    with counter_lock:
        counter["value"] += 1
        path = os.path.join(OUT_DIR, f"captured_{source}_{counter['value']}.pb")
    with open(path, "wb") as file:
        file.write(body)
    print(f"recorded {len(body)} bytes to {path}", flush=True)


def export(request_bytes, context):
    record("otlp_grpc", request_bytes)
    return b""  # an empty ExportTraceServiceResponse: full success


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path != "/api/v1/agent_instance/info":
            self.send_error(404)
            return
        body = json.dumps(
            {
                "id": "inst_acme_research",
                "name": "Acme Research Agent",
                "organization_id": "ws_demo",
                "workspace_id": "ws_demo",
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.headers.get("Content-Encoding", "") == "gzip":
            body = gzip.decompress(body)
        record("otlp_http", body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
handler = grpc.method_handlers_generic_handler(
    "opentelemetry.proto.collector.trace.v1.TraceService",
    {"Export": grpc.unary_unary_rpc_method_handler(export)},
)
grpc_server.add_generic_rpc_handlers((handler,))
grpc_server.add_insecure_port(f"127.0.0.1:{os.environ['GRPC_PORT']}")
grpc_server.start()
print("ready", flush=True)
ThreadingHTTPServer(("127.0.0.1", int(os.environ["HTTP_PORT"])), Handler).serve_forever()
