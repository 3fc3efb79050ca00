"""A stand-in for `vllm serve` on CPU: same command line, same endpoints, vLLM's own request validation.

``python openai_stub.py serve CHECKPOINT --host H --port P [any other vllm serve flag]`` answers /health, /v1/models
and /v1/chat/completions. Each chat request is validated with vLLM's ``ChatCompletionRequest`` (when vLLM is
importable) and answered deterministically (seeded), with prompt tokens counted the way our model counts them: text
words plus ``num_audio_tokens`` for each audio part. ``EMOREASON_STUB_FAULT=ignore_audio`` makes it count no audio
tokens, ``=ignore_seed`` makes sampling ignore the seed: the smoke script must catch both.
``EMOREASON_STUB_VALIDATE=0`` skips the (slow to import) vLLM validation.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import sys
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def _load_audio_tokens():
    """emoreason.data.audio_tokens, loaded by path: the stub runs before the package's audio dependencies may be there."""
    import importlib.util

    package = Path(importlib.util.find_spec("emoreason").origin).parent
    spec = importlib.util.spec_from_file_location("_audio_tokens", package / "data" / "audio_tokens.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_audio_tokens = _load_audio_tokens()
SAMPLE_RATE, num_audio_tokens = _audio_tokens.SAMPLE_RATE, _audio_tokens.num_audio_tokens

ChatCompletionRequest = None
if os.environ.get("EMOREASON_STUB_VALIDATE", "1") == "1":  # importing vLLM costs ~20 s of CPU; tests may skip it
    try:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    except ImportError:  # the stub also runs where vLLM is absent
        pass

WORDS = ["the", "pitch", "is", "high", "and", "the", "rate", "fast", "so", "<answer>", "happy", "</answer>"]


def clip_samples(part: dict) -> int:
    if part["type"] == "input_audio":
        data = part["input_audio"]["data"]
    else:
        data = part["audio_url"]["url"].split(",", 1)[1]
    with wave.open(io.BytesIO(base64.b64decode(data))) as clip:
        return round(clip.getnframes() * SAMPLE_RATE / clip.getframerate())


class Handler(BaseHTTPRequestHandler):
    server_version = "emoreason-vllm-stub"

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            self._send(200, {})
        elif self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model"}]})
        else:
            self._send(404, {"error": self.path})

    def do_POST(self):
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": self.path})
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if ChatCompletionRequest is not None:
            try:
                ChatCompletionRequest.model_validate(body)
            except Exception as err:
                return self._send(400, {"error": {"message": str(err)}})
        self._send(200, self.complete(body))

    def complete(self, body: dict) -> dict:
        fault = os.environ.get("EMOREASON_STUB_FAULT", "")
        prompt_tokens = 0
        for message in body["messages"]:
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                if part["type"] == "text":
                    prompt_tokens += len(part["text"].split()) + 4
                elif fault != "ignore_audio":
                    prompt_tokens += num_audio_tokens(clip_samples(part), *self.server.audio_shape) + 1
        seed = body.get("seed") if fault != "ignore_seed" else None
        rng = random.Random(seed)
        max_tokens = body.get("max_tokens") or 16
        choices = []
        for index in range(body.get("n") or 1):
            words = WORDS[:max_tokens] if not body.get("temperature") else rng.sample(WORDS, min(max_tokens, 6))
            logprobs = None
            if body.get("logprobs"):
                top = body.get("top_logprobs") or 0
                logprobs = {"content": [{"token": w, "logprob": -0.5, "top_logprobs": [
                    {"token": w, "logprob": -0.5 - k} for k in range(top)]} for w in words]}
            choices.append({"index": index, "message": {"role": "assistant", "content": " ".join(words)},
                            "logprobs": logprobs, "finish_reason": "length" if len(words) == max_tokens else "stop"})
        completion = sum(len(c["message"]["content"].split()) for c in choices)
        return {"id": "chatcmpl-stub", "object": "chat.completion", "model": body["model"], "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None)
    args, _ = parser.parse_known_args(argv)
    config = json.loads((Path(args.model) / "config.json").read_text())
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.model_name = args.served_model_name or Path(args.model).name
    server.audio_shape = (config["stack_factor"], config["content_config"]["max_source_positions"])
    print(f"stub serving {server.model_name} on {args.host}:{args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
