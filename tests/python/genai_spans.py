"""GenAI spans as OpenTelemetry instrumentations emit them, sent with OpenTelemetry's own Python
SDK and OTLP/HTTP exporter (protobuf, gzip, Authorization: Bearer).

The three generations of OpenLLMetry's Gemini instrumentor, plus an OpenAI chat span with token
counts as a string and a double, and a plain (non-GenAI) span. LLM spans are root spans carrying
value.action.user_id, as value-python's span processor stamps them inside action_context().

Environment: OTLP_HTTP_TRACES_URL (http://127.0.0.1:<port>/v1/traces), AGENT_SECRET.
"""

import json
import os

from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

exporter = OTLPSpanExporter(
    endpoint=os.environ["OTLP_HTTP_TRACES_URL"],
    headers={"Authorization": "Bearer " + os.environ["AGENT_SECRET"]},
    compression=Compression.Gzip,
)
provider = TracerProvider(resource=Resource.create({"service.name": "genai-test-agent"}))
provider.add_span_processor(BatchSpanProcessor(exporter))
tracer = provider.get_tracer("genai-test")

SPANS = [
    # <= 0.47
    (
        "gemini.generate_content",
        {
            "gen_ai.system": "Google",
            "gen_ai.request.model": "gemini-2.5-flash",
            "gen_ai.usage.prompt_tokens": 100,
            "gen_ai.usage.completion_tokens": 40,
            "llm.usage.total_tokens": 140,
            "value.action.user_id": "user_legacy",
            "value.action.anonymous_id": "anon_legacy",
        },
    ),
    # 0.48 - 0.57
    (
        "gemini.generate_content",
        {
            "gen_ai.system": "Google",
            "gen_ai.request.model": "gemini-2.5-flash",
            "gen_ai.usage.input_tokens": 200,
            "gen_ai.usage.output_tokens": 50,
            "llm.usage.total_tokens": 250,
            "value.action.user_id": "user_middle",
            "value.action.anonymous_id": "anon_middle",
        },
    ),
    # >= 0.58: thinking tokens make total (400) larger than input + output (360).
    (
        "generate_content gemini-2.5-flash",
        {
            "gen_ai.provider.name": "gcp.gen_ai",
            "gen_ai.operation.name": "generate_content",
            "gen_ai.request.model": "gemini-2.5-flash",
            "gen_ai.usage.input_tokens": 300,
            "gen_ai.usage.output_tokens": 60,
            "gen_ai.usage.total_tokens": 400,
            "value.action.user_id": "user_current",
            "value.action.anonymous_id": "anon_current",
        },
    ),
    # Another provider; integers as a string and as a double.
    (
        "chat gpt-4o",
        {
            "gen_ai.system": "openai",
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": "gpt-4o",
            "gen_ai.usage.input_tokens": "12",
            "gen_ai.usage.output_tokens": 7.0,
            "value.action.anonymous_id": "anon_openai",
        },
    ),
    # Not GenAI: a trace event named by the span.
    ("retrieve_documents", {"documents": 3, "value.action.anonymous_id": "anon_rag"}),
]

for name, attributes in SPANS:
    with tracer.start_as_current_span(name, attributes=attributes):
        pass

flushed = provider.force_flush(30_000)
provider.shutdown()
print(json.dumps({"spans": len(SPANS), "flushed": flushed}), flush=True)
