"""The OpenAI-compatible HTTP layer: ``/v1/chat/completions``, ``/v1/models``, ``/health``.

Requests are validated here (messages, sampling settings, audio decoding) so that a bad request gets a 400 with the
reason before it reaches the batching queue; errors use OpenAI's ``{"error": {...}}`` shape, which the ``openai``
client turns into ``BadRequestError`` / ``AuthenticationError`` / ``NotFoundError``.

Limits, each a clear error rather than a silent cut or an exhausted server:
  body size      ``max_body_bytes``: the declared Content-Length is checked before a byte is read, and the stream is
                 counted as it arrives (chunked bodies); 413 above it.
  audio length   ``max_audio_seconds`` (default and ceiling: the encoder window, 30 s): 400 naming the clip's length.
  no speech      a clip shorter than 0.1 s or silent (its loudest 10 ms frame below -60 dBFS): 400 with the reason,
                 by :func:`emoreason.data.audio.silent_or_too_short`, the rule datagen refuses such clips by.
  tokens         prompt + ``max_tokens`` must fit the model's context (400 otherwise, as vLLM does); without
                 ``max_tokens`` the default is lowered to what fits.
  parameters     out-of-range values (seed outside [0, 2**63-1], temperature, top_p, n, top_logprobs...) are 400s.
A client that disconnects cancels its request (its rows stop at the next decoding step). With an API key set, every
path but ``/health`` needs it, the OpenAPI schema and ``/docs`` included; the key is compared as bytes, so a non-ASCII
key or header is a 401 when it does not match, never a 500.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..data.audio import silent_or_too_short
from .audio_inputs import AUDIO_PART_TYPES, AudioInputError, decode_audio_part
from .engine import PreparedRequest, SamplingParams, TransformersEngine

MAX_N = 64
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_SEED = 2**63 - 1  # torch.manual_seed's range
DEFAULT_MAX_BODY_BYTES = 64 * 2**20  # 30 s of 48 kHz stereo float WAV is 11.5 MB, 15 MB as base64
DISCONNECT_POLL_S = 0.1
OPEN_PATHS = ("/health",)  # answered without the API key (load balancers)


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
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool = False
    # vLLM extensions, used by budget forcing to continue a partial assistant message.
    continue_final_message: bool = False
    add_generation_prompt: bool = True

    @field_validator("stop")
    @classmethod
    def _few_stop_strings(cls, value):
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return value


class RequestError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def error_response(message: str, status: int, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")
    if status >= 500:
        kind = "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class _ApiKeyMiddleware:
    """Pure ASGI (no response buffering, the client's disconnect stays visible to the endpoint)."""

    def __init__(self, app, api_key: str):
        # Compared as bytes: compare_digest refuses str with non-ASCII characters (a 500, not a 401).
        self.app, self.api_key = app, api_key.encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            headers = dict(scope.get("headers") or [])
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.api_key):
                response = error_response("invalid or missing API key (Authorization: Bearer ...)", 401,
                                          code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit``: from the declared Content-Length
    before reading anything, else while the stream arrives."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError(f"invalid Content-Length {declared!r}") from None
        if size > limit:
            raise RequestError(f"the request body is {size} bytes; this server accepts at most {limit} "
                               "(--max-body-mb)", 413, code="request_too_large")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise RequestError(f"the request body exceeds {limit} bytes (--max-body-mb)", 413,
                               code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _until_done_or_disconnected(request: Request, task: asyncio.Task):
    """Await ``task``; cancel it (and so its generation) when the client disconnects first."""
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            return None


def create_app(
    engine: TransformersEngine,
    model_name: str,
    api_key: str | None = None,
    allowed_audio_root: str | None = None,
    default_max_tokens: int = 256,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_audio_seconds: float | None = None,
) -> FastAPI:
    """``max_audio_seconds``: None means the encoder window; a larger value is refused (the model would not hear the
    rest of the clip)."""
    window = engine.max_audio_seconds
    if max_audio_seconds is None:
        max_audio_seconds = window
    if not 0 < max_audio_seconds <= window:
        raise ValueError(f"max_audio_seconds must be in (0, {window:g}] (the encoder hears at most {window:g} s), "
                         f"got {max_audio_seconds}")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
    limits = Limits(default_max_tokens=default_max_tokens, max_audio_seconds=float(max_audio_seconds),
                    allowed_audio_root=allowed_audio_root)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="emoreason", lifespan=lifespan)
    created = int(time.time())
    if api_key:
        app.add_middleware(_ApiKeyMiddleware, api_key=api_key)

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
        raw = await read_body(request, max_body_bytes)
        try:
            body = json.loads(raw)
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
        prepared = await run_in_threadpool(prepare_request, req, engine, limits)
        try:
            result = await _until_done_or_disconnected(request, asyncio.ensure_future(engine.submit(prepared)))
        except Exception as err:  # logged by the engine; the client gets the reason in OpenAI's error shape
            raise RequestError(f"generation failed: {type(err).__name__}: {err}", 500) from None
        if result is None:  # the client went away; nobody reads this
            return JSONResponse({"error": {"message": "client disconnected", "type": "cancelled"}}, 499)
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


@dataclass(frozen=True)
class Limits:
    default_max_tokens: int = 256
    max_audio_seconds: float = 30.0
    allowed_audio_root: str | None = None


def prepare_request(req: ChatCompletionRequest, engine: TransformersEngine, limits: Limits) -> PreparedRequest:
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
                        clip = decode_audio_part(part, limits.allowed_audio_root, where=where,
                                                 max_seconds=limits.max_audio_seconds)
                    except AudioInputError as err:
                        raise RequestError(str(err), param=where) from None
                    refused = silent_or_too_short(clip)  # the rule datagen applies to the clips it describes
                    if refused:
                        raise RequestError(f"{where}: {refused}", param=where)
                    clips.append(clip)
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
    context = engine.max_model_len
    prompt_tokens = engine.count_prompt_tokens(prompt, clips)
    requested = req.max_completion_tokens or req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    if requested is not None and requested > context:
        raise RequestError(f"{param}={requested} is more than the model's context of {context} tokens", param=param)
    if prompt_tokens >= context:
        raise RequestError(f"the prompt is {prompt_tokens} tokens; the model's context is {context} tokens",
                           param="messages")
    if requested is not None and prompt_tokens + requested > context:
        raise RequestError(f"the prompt ({prompt_tokens} tokens) plus {param}={requested} exceeds the model's "
                           f"context of {context} tokens; ask for at most {context - prompt_tokens}", param=param)
    max_tokens = requested if requested is not None else min(limits.default_max_tokens, context - prompt_tokens)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=tuple(s for s in stop if s),
        seed=req.seed,
        logprobs=req.logprobs,
        top_logprobs=req.top_logprobs or 0,
    )
    return PreparedRequest(prompt=prompt, clips=clips, params=params, n=req.n)
