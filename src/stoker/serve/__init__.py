"""Serving: a continuous-batching engine (engine.py) behind an HTTP API (server.py), several
models per server (models.py), a client (client.py)."""
