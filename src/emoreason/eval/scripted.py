"""A scripted OpenAI-compatible endpoint: answers come from a Python function, not a model.

Tests use it to check strategies, retries, caching and reports exactly (the tiny model's text is gibberish), and to
dry-run a suite's plumbing. ``script(body) -> list[str]`` returns one completion per requested choice (or raises
:class:`ScriptedError` to answer with an HTTP error, or returns a ``fastapi.Response`` to send as it is: an HTML page, a
truncated body); every request is counted in ``hits``.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response


class ScriptedError(Exception):
    def __init__(self, status: int = 500, message: str = "scripted failure"):
        super().__init__(message)
        self.status, self.message = status, message


def pseudo_logprob(text: str, index: int) -> float:
    """Deterministic per-token log-probabilities for scripted answers: a text's mean logprob is a function of it."""
    return -0.1 * (1 + (sum(map(ord, text)) + index) % 7)


def create_scripted_app(script: Callable[[dict], list[str]], model: str = "scripted",
                        delay_s: float = 0.0) -> FastAPI:
    app = FastAPI()
    app.state.hits = 0
    app.state.bodies = []
    lock = threading.Lock()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        with lock:
            app.state.hits += 1
            app.state.bodies.append(body)
        if delay_s:
            await asyncio.sleep(delay_s)
        try:
            answers = script(body)
        except ScriptedError as err:
            return JSONResponse({"error": {"message": err.message, "type": "server_error"}}, status_code=err.status)
        if isinstance(answers, Response):
            return answers
        choices = []
        for i, text in enumerate(answers):
            logprobs = None
            if body.get("logprobs"):
                tokens = text.split() or [""]
                logprobs = {"content": [{"token": t, "logprob": pseudo_logprob(text, j), "bytes": None,
                                         "top_logprobs": []} for j, t in enumerate(tokens)]}
            choices.append({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                            "logprobs": logprobs})
        completion = sum(max(1, len(t.split())) for t in answers)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model, "choices": choices,
                "usage": {"prompt_tokens": 10, "completion_tokens": completion, "total_tokens": 10 + completion}}

    return app


def last_user_text(body: dict[str, Any]) -> str:
    """The text parts of the last user message (what scripts usually branch on)."""
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            return "\n".join(p.get("text", "") for p in content or [] if p.get("type") == "text")
    return ""
