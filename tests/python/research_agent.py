"""The getting-started guide's research agent (Step 8), run unchanged against agentmeter.

Environment (set by tests/ingest_otlp.rs):
  VALUE_AGENT_SECRET          the agent secret
  VALUE_BACKEND_URL           ingest's HTTP API (GET /api/v1/agent_instance/info)
  VALUE_OTEL_ENDPOINT         ingest's OTLP/gRPC receiver, http://127.0.0.1:<port>
  OTEL_EXPORTER_OTLP_HEADERS  x-agent-secret=<secret> (the test also runs without it)

Only difference from the guide: value-python 0.1.6's action_context() requires anonymous_id.
Prints one JSON line with what initialize_sync() learned and whether the spans were flushed.
"""

import json
import os

from opentelemetry import trace
from value import initialize_sync

AGENT_SECRET = os.getenv("VALUE_AGENT_SECRET")
client = initialize_sync(agent_secret=AGENT_SECRET)


def perform_web_search(topic):
    return [f"{topic}: result one", f"{topic}: result two"]


def call_llm_to_summarize(results):
    return "summary of " + "; ".join(results)


def send_to_user(user_id, summary):
    pass


def run_research(user_id: str, topic: str, anonymous_id: str):
    """A research agent workflow; each action is tracked so we know what to charge."""
    with client.action_context(user_id=user_id, anonymous_id=anonymous_id) as ctx:
        search_results = perform_web_search(topic)
        ctx.send(
            action_name="web_search",
            **{
                "value.action.description": f"Searched for: {topic}",
                "results_count": len(search_results),
                "search_provider": "google",
            },
        )

        summary = call_llm_to_summarize(search_results)
        ctx.send(
            action_name="llm_call",
            **{
                "value.action.description": "Summarized search results",
                "model": "gpt-4",
                "input_tokens": 2500,
                "output_tokens": 800,
                "cost_usd": 0.12,
            },
        )

        send_to_user(user_id, summary)
        ctx.send(
            action_name="delivery",
            **{
                "value.action.description": "Sent summary to user",
                "delivery_method": "email",
            },
        )
        return summary


run_research(user_id="user_acme_123", topic="market trends in AI", anonymous_id="session_acme_1")

# An anonymous trial user (the guide's "Always Identify the User").
with client.action_context(anonymous_id="trial_session_abc") as ctx:
    ctx.send(action_name="web_search", results_count=1, search_provider="google")

# value-python exports through a BatchSpanProcessor (every 5 s, and at interpreter exit).
# force_flush() sends everything now, so the test need not wait.
flushed = trace.get_tracer_provider().force_flush(30_000)
print(
    json.dumps(
        {
            "agent_id": client.agent_id,
            "agent_name": client.agent_name,
            "workspace_id": client.workspace_id,
            "organization_id": client.organization_id,
            "flushed": flushed,
        }
    ),
    flush=True,
)
