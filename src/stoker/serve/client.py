"""A small client for a `stoker serve` server, on the standard library only (no vendor SDK).

    from stoker.serve.client import Client
    c = Client("http://127.0.0.1:8000")            # api_key defaults to $STOKER_API_KEY
    c.complete("def main():", max_tokens=50)["choices"][0]["text"]
    for piece in c.stream("def main():", max_tokens=50): print(piece, end="")
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any


class ServeError(Exception):
    """The server answered with an error status; `status` and the server's `message`."""

    def __init__(self, status: int, message: str, retry_after: str | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.retry_after = status, message, retry_after


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 600.0):
        self.url = url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("STOKER_API_KEY")
        self.timeout = timeout

    def _open(self, path: str, body: dict | None = None):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method="GET" if body is None else "POST")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raw = e.read().decode(errors="replace")
            try:
                msg = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = raw
            raise ServeError(e.code, msg, e.headers.get("Retry-After")) from None

    def _json(self, path: str, body: dict | None = None) -> Any:
        with self._open(path, body) as r:
            return json.loads(r.read())

    def health(self) -> dict:
        return self._json("/health")

    def models(self) -> list[str]:
        return [m["id"] for m in self._json("/v1/models")["data"]]

    def complete(self, prompt: str | list[str], model: str | None = None, **params: Any) -> dict:
        """POST /v1/completions; params as in the OpenAI API (max_tokens, temperature, top_p, stop, seed) plus top_k."""
        return self._json("/v1/completions", {"model": model, "prompt": prompt, **params})

    def stream(self, prompt: str, model: str | None = None, **params: Any) -> Iterator[str]:
        """Text pieces of one completion as the server sends them (server-sent events)."""
        with self._open("/v1/completions", {"model": model, "prompt": prompt, **params, "stream": True}) as r:
            for line in r:
                line = line.decode().strip()
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return
                for choice in json.loads(line[6:])["choices"]:
                    if choice["text"]:
                        yield choice["text"]

    def generate(self, text: str, model: str | None = None, **params: Any) -> dict:
        """POST /api/v1/task/text-generation: max_new_tokens, temperature, top_k, top_p, seed, stop."""
        return self._json("/api/v1/task/text-generation", {"model": model, "text": text, **params})

    def tokenize(self, text: str, model: str | None = None) -> dict:
        return self._json("/api/v1/task/tokenization", {"model": model, "text": text})
