#!/usr/bin/env python3
"""Smoke-test a running OpenAI-compatible server that serves an EmoReason checkpoint (vLLM or the built-in one).

    python scripts/vllm_smoke.py --base-url http://127.0.0.1:8000/v1 --checkpoint runs/sft/final

Checks, each printed as PASS/FAIL with what was seen:
  health         GET /health answers 200
  models         GET /v1/models lists the served model
  input_audio    a chat completion with a base64 WAV (`input_audio` part), greedy, returns text and usage
  audio_tokens   the audio costs what it lasts: prompt tokens with the clip minus without it equals the clip's
                 `<audio>` token count (emoreason.data.audio_tokens), within --token-slack for the separator
  audio_url      a `data:` URL audio part, n=2, temperature, top_p, seed, stop, logprobs/top_logprobs all honoured
  seed           the same seeded sampled request twice gives the same text
  concurrent     --concurrency requests at once all succeed (the server batches them)

Standard library only, so it runs from any environment (the vLLM one, the training one, a laptop). Without --audio
it synthesises a 3 s test clip (a gliding tone with a pause). Exit code 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import math
import struct
import sys
import time
import urllib.error
import urllib.request
import wave
from pathlib import Path

SAMPLE_RATE = 16_000


def num_audio_tokens(num_samples: int, stack_factor: int, max_source_positions: int = 1500) -> int:
    """`<audio>` tokens of a 16 kHz clip: emoreason.data.audio_tokens.num_audio_tokens, restated so this script
    needs nothing installed (tests_vllm/test_smoke_script.py checks the two agree)."""
    samples = max(SAMPLE_RATE // 10, min(int(num_samples), max_source_positions * 2 * 160))
    encoder_frames = (samples // 160 - 1) // 2 + 1
    return math.ceil(encoder_frames / stack_factor)


def synth_wav(seconds: float = 3.0) -> bytes:
    """A 16 kHz mono WAV: a tone gliding 150 -> 300 Hz with a 0.3 s pause, so encoders see some structure."""
    frames = bytearray()
    n = int(seconds * SAMPLE_RATE)
    phase = 0.0
    for i in range(n):
        t = i / SAMPLE_RATE
        phase += 2 * math.pi * (150 + 150 * t / seconds) / SAMPLE_RATE
        gain = 0.0 if 1.2 < t < 1.5 else 0.3
        frames += struct.pack("<h", int(32767 * gain * math.sin(phase)))
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(bytes(frames))
    return buffer.getvalue()


def wav_num_samples_16k(data: bytes) -> int:
    with wave.open(io.BytesIO(data)) as clip:
        return round(clip.getnframes() * SAMPLE_RATE / clip.getframerate())


class Client:
    def __init__(self, base_url: str, api_key: str | None, timeout: float):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def request(self, method: str, url: str, body: dict | None = None) -> tuple[int, dict | str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                raw = response.read().decode()
                status = response.status
        except urllib.error.HTTPError as err:
            raw, status = err.read().decode(errors="replace"), err.code
        try:
            return status, json.loads(raw)
        except json.JSONDecodeError:
            return status, raw

    def get(self, path: str) -> tuple[int, dict | str]:
        return self.request("GET", self.base_url + path)

    def chat(self, body: dict) -> dict:
        status, payload = self.request("POST", self.base_url + "/chat/completions", body)
        if status != 200 or not isinstance(payload, dict):
            raise RuntimeError(f"HTTP {status}: {str(payload)[:300]}")
        return payload


def audio_message(part: dict, text: str) -> list[dict]:
    return [{"role": "user", "content": [part, {"type": "text", "text": text}]}]


def input_audio_part(wav: bytes) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}


def audio_url_part(wav: bytes) -> dict:
    return {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64," + base64.b64encode(wav).decode()}}


def run_checks(args: argparse.Namespace) -> list[tuple[str, bool, str]]:
    client = Client(args.base_url, args.api_key, args.timeout)
    wav = Path(args.audio).read_bytes() if args.audio else synth_wav(args.seconds)
    stack_factor, max_positions = args.stack_factor, args.max_source_positions
    if args.checkpoint:
        config = json.loads((Path(args.checkpoint) / "config.json").read_text())
        stack_factor = config.get("stack_factor", stack_factor)
        max_positions = config.get("content_config", {}).get("max_source_positions", max_positions)
    expected_audio_tokens = num_audio_tokens(wav_num_samples_16k(wav), stack_factor, max_positions)
    question = "What emotion does the speaker express? Explain your reasoning, then answer."
    results: list[tuple[str, bool, str]] = []

    def check(name: str, fn) -> object:
        try:
            ok, detail, value = fn()
        except Exception as err:  # one failing check must not hide the others
            ok, detail, value = False, f"{type(err).__name__}: {err}", None
        results.append((name, bool(ok), detail))
        print(f"{'PASS' if ok else 'FAIL'}  {name:<13} {detail}", flush=True)
        return value

    root = args.base_url.rstrip("/").removesuffix("/v1")
    check("health", lambda: (lambda s: (s[0] == 200, f"HTTP {s[0]}", None))(client.request("GET", root + "/health")))

    def models():
        status, payload = client.get("/models")
        names = [m.get("id") for m in payload.get("data", [])] if isinstance(payload, dict) else []
        model = args.model or (names[0] if names else None)
        return status == 200 and model in names, f"served {names}", model

    model = check("models", models) or args.model
    base = {"model": model, "max_tokens": args.max_tokens}

    def greedy():
        reply = client.chat({**base, "messages": audio_message(input_audio_part(wav), question), "temperature": 0})
        choice = reply["choices"][0]
        text = choice["message"]["content"]
        ok = isinstance(text, str) and choice.get("finish_reason") in ("stop", "length") and reply.get("usage")
        return ok, f"{reply['usage']} -> {text[:60]!r}", reply["usage"]["prompt_tokens"]

    with_audio = check("input_audio", greedy)

    def audio_tokens():
        reply = client.chat({**base, "messages": [{"role": "user", "content": question}], "temperature": 0,
                             "max_tokens": 1})
        text_only = reply["usage"]["prompt_tokens"]
        extra = with_audio - text_only
        ok = expected_audio_tokens <= extra <= expected_audio_tokens + args.token_slack
        return ok, f"audio added {extra} prompt tokens, clip needs {expected_audio_tokens}", None

    if with_audio is not None:
        check("audio_tokens", audio_tokens)

    sampled = {**base, "messages": audio_message(audio_url_part(wav), question), "n": 2, "temperature": 1.0,
               "top_p": 0.9, "seed": 1234, "stop": ["</answer>"], "logprobs": True, "top_logprobs": 2}

    def audio_url():
        reply = client.chat(sampled)
        choices = reply["choices"]
        logprobs = [c.get("logprobs") or {} for c in choices]
        top = [entry.get("top_logprobs") for lp in logprobs for entry in (lp.get("content") or [])]
        ok = len(choices) == 2 and all(lp.get("content") for lp in logprobs) and all(len(t) == 2 for t in top)
        return ok, f"{len(choices)} choices, {len(top)} tokens with top_logprobs", [c["message"]["content"]
                                                                                     for c in choices]

    first = check("audio_url", audio_url)

    def seed():
        again = [c["message"]["content"] for c in client.chat(sampled)["choices"]]
        return again == first, "same seed, same samples" if again == first else f"{first!r} != {again!r}", None

    if first is not None:
        check("seed", seed)

    def concurrent_requests():
        body = {**base, "messages": audio_message(input_audio_part(wav), question), "temperature": 0.7}
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            replies = list(pool.map(lambda _: client.chat(body), range(args.concurrency)))
        elapsed = time.perf_counter() - start
        tokens = sum(r["usage"]["completion_tokens"] for r in replies)
        return len(replies) == args.concurrency, (f"{len(replies)} requests in {elapsed:.2f} s, "
                                                  f"{tokens / max(elapsed, 1e-9):.1f} completion tokens/s"), None

    check("concurrent", concurrent_requests)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default=None, help="served model name (default: the first one /v1/models lists)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint folder, to read stack_factor and the encoder window for the token check")
    parser.add_argument("--stack-factor", type=int, default=4)
    parser.add_argument("--max-source-positions", type=int, default=1500)
    parser.add_argument("--audio", default=None, help="a WAV file (default: a synthesised clip)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of the synthesised clip")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--token-slack", type=int, default=3,
                        help="prompt tokens the audio part may add beyond its `<audio>` tokens (the separator)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--report", default=None, help="also write the results as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = run_checks(args)
    failed = [name for name, ok, _ in results if not ok]
    summary = {"passed": len(results) - len(failed), "failed": failed,
               "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in results]}
    if args.report:
        Path(args.report).write_text(json.dumps(summary, indent=2))
    print(f"{summary['passed']}/{len(results)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
