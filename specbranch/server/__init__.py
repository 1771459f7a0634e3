"""OpenAI-compatible HTTP server (`specbranch serve`); needs the `serve` extra (fastapi, uvicorn,
prometheus-client)."""

from .app import build_server, create_app

__all__ = ["build_server", "create_app"]
