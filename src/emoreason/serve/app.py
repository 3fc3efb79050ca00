"""The OpenAI-compatible HTTP layer: ``/v1/chat/completions``, ``/v1/models``, ``/health``.

Requests are validated here (messages, sampling settings, audio decoding) so that a bad request gets a 400 with the
reason before it reaches the batching queue; errors use OpenAI's ``{"error": {...}}`` shape, which the ``openai``
client turns into ``BadRequestError`` / ``AuthenticationError`` / ``NotFoundError``.
"""

from __future__ import annotations

import secrets
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .audio_inputs import AUDIO_PART_TYPES, AudioInputError, decode_audio_part
from .engine import PreparedRequest, SamplingParams, TransformersEngine

MAX_N = 64
MAX_TOP_LOGPROBS = 20


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(BaseModel):
    # Unknown OpenAI fields (user, metadata, ...) are accepted and ignored, as vLLM does.
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool = False
    # vLLM extensions, used by budget forcing to continue a partial assistant message.
    continue_final_message: bool = False
    add_generation_prompt: bool = True


class RequestError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def error_response(message: str, status: int, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")
    if status >= 500:
        kind = "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def create_app(
    engine: TransformersEngine,
    model_name: str,
    api_key: str | None = None,
    allowed_audio_root: str | None = None,
    default_max_tokens: int = 256,
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="emoreason", lifespan=lifespan)
    created = int(time.time())

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), api_key):
                return error_response("invalid or missing API key (Authorization: Bearer ...)", 401,
                                      code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(RequestError)
    async def request_error(_request: Request, err: RequestError):
        return error_response(str(err), err.status, err.param, err.code)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "batches": engine.batches_run, "rows": engine.rows_run}

    @app.get("/v1/models")
    async def models():
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "emoreason"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise RequestError("the request body is not valid JSON") from None
        try:
            req = ChatCompletionRequest.model_validate(body)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise RequestError(f"{where}: {first['msg']}", param=where) from None
        if req.model != model_name:
            raise RequestError(f"model {req.model!r} does not exist; this server serves {model_name!r}", 404,
                               param="model", code="model_not_found")
        if req.stream:
            raise RequestError("stream=true is not supported by the transformers backend", param="stream")
        prepared = await run_in_threadpool(prepare_request, req, engine, allowed_audio_root, default_max_tokens)
        try:
            result = await engine.submit(prepared)
        except Exception as err:  # logged by the engine; the client gets the reason in OpenAI's error shape
            raise RequestError(f"generation failed: {type(err).__name__}: {err}", 500) from None
        choices = []
        for index, choice in enumerate(result.choices):
            # With continue_final_message the content is only the continuation, as in vLLM.
            choices.append({
                "index": index,
                "message": {"role": "assistant", "content": choice.text},
                "finish_reason": choice.finish_reason,
                "logprobs": {"content": choice.logprobs} if choice.logprobs is not None else None,
            })
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                      "total_tokens": result.prompt_tokens + result.completion_tokens},
        }

    return app


def prepare_request(
    req: ChatCompletionRequest, engine: TransformersEngine, allowed_audio_root: str | None, default_max_tokens: int
) -> PreparedRequest:
    """Decode audio parts, render the chat template, check placeholders; raises :class:`RequestError`."""
    clips, messages = [], []
    for m_index, message in enumerate(req.messages):
        content = message.content
        if isinstance(content, list):
            parts = []
            for p_index, part in enumerate(content):
                where = f"messages.{m_index}.content.{p_index}"
                kind = part.get("type")
                if kind in AUDIO_PART_TYPES:
                    try:
                        clips.append(decode_audio_part(part, allowed_audio_root, where=where))
                    except AudioInputError as err:
                        raise RequestError(str(err), param=where) from None
                    parts.append({"type": "audio"})
                elif kind == "text":
                    parts.append({"type": "text", "text": str(part.get("text", ""))})
                else:
                    raise RequestError(f"{where}: unsupported content part type {kind!r}", param=where)
            content = parts
        messages.append({"role": "system" if message.role == "developer" else message.role, "content": content or ""})
    processor = engine.processor
    if req.continue_final_message:
        if messages[-1]["role"] != "assistant":
            raise RequestError("continue_final_message needs the last message to be the assistant's",
                               param="messages")
        prefix = processor.apply_chat_template(messages[:-1], add_generation_prompt=True)
        prompt = prefix + processor._flatten_content(messages[-1]["content"])
    else:
        prompt = processor.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt)
    placeholders = engine.num_prompt_placeholders(prompt)
    if placeholders != len(clips):
        raise RequestError(f"the prompt has {placeholders} `{processor.audio_token}` placeholder(s) for {len(clips)} "
                           "audio part(s); do not write the placeholder in text", param="messages")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if req.top_logprobs and not req.logprobs:
        raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")
    params = SamplingParams(
        max_tokens=req.max_completion_tokens or req.max_tokens or default_max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=tuple(s for s in stop if s),
        seed=req.seed,
        logprobs=req.logprobs,
        top_logprobs=req.top_logprobs or 0,
    )
    return PreparedRequest(prompt=prompt, clips=clips, params=params, n=req.n)
