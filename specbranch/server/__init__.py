"""OpenAI-compatible HTTP server (`specbranch serve`); needs the `serve` extra (fastapi, uvicorn,
prometheus-client).

    specbranch serve --port 8000            # default pair, engine specbranch
    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="qwen2.5-coder-1.5b-instruct", messages=[...], stream=True,
                                   extra_body={"speculative": {"engine": "pearl", "num_draft_tokens": 4}})

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (OpenAI fields plus the extensions
``top_k`` and ``speculative: {engine, num_draft_tokens, branches, tau, draft_sampling}``; responses
add ``speculative_metrics``), /metrics (Prometheus), /health (never needs the API key). Requests
are served one at a time; ``--max-queue`` may wait, the rest get 429. Streams send one chunk per
token, then a chunk with ``finish_reason``, ``usage`` and ``speculative_metrics``, then (with
``stream_options.include_usage``) OpenAI's usage-only chunk, then ``data: [DONE]``. Omitted
``temperature`` means 1.0 as in OpenAI's API; send 0 for greedy (exactly the target's argmax).
"""

from .app import build_server, create_app

__all__ = ["build_server", "create_app"]
