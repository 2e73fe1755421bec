"""Serving a model over an OpenAI-compatible HTTP API: `pmetal serve` (the `serve` extra).

models.py (the base and its adapters by name), scheduler.py (micro-batching onto the rollout
engine), text.py (prompts, stop strings, tool calls), schemas.py (request bodies, errors), app.py
(the FastAPI application).
"""
