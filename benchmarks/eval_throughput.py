"""Evaluator throughput against the built-in server (tiny model, CPU), measured side by side in one run:

1. self-consistency@8 for one clip as one ``n=8`` request vs 8 requests of ``n=1`` (sent one after another, and all
   at once), i.e. what batching the samples of one item buys;
2. a batch of single-sample items at concurrency 8 vs concurrency 1, i.e. what the server's batching queue buys;
3. where a vLLM environment is found (``.venv-vllm``, or ``--vllm-bin``; `make test-vllm` builds the CPU one):
   items/s of the built-in server and of vLLM (``emoreason serve --backend vllm``, the same checkpoint) at
   concurrency 1 and 8, and their ratio. Each engine runs alone (vLLM is started after the built-in server stops).

    python benchmarks/eval_throughput.py [--items 16] [--max-tokens 32] [--num-threads 1] [--model DIR] [--vllm auto]

Prints wall times, items/s and ratios (>1 = the first option is faster). Absolute numbers depend on the machine;
the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_clips(count: int, seed: int = 0) -> list[dict]:
    from emoreason.data.audio import encode_wav
    from emoreason.data.conversation import input_audio_part

    rng = np.random.default_rng(seed)
    clips = []
    for i in range(count):
        seconds = 1.5 + (i % 4) * 0.5
        t = np.arange(int(16000 * seconds)) / 16000
        wave = 0.3 * np.sin(2 * np.pi * (120 + 40 * i) * t) + 0.02 * rng.standard_normal(t.shape)
        clips.append(input_audio_part(encode_wav(wave.astype(np.float32))))
    return clips


def messages(part: dict) -> list[dict]:
    return [{"role": "user", "content": [part, {"type": "text", "text": "Which emotion does the speaker express?"}]}]


async def timed(coro) -> float:
    start = time.perf_counter()
    await coro
    return time.perf_counter() - start


async def run(url: str, clips: list[dict], max_tokens: int, repeats: int) -> dict[str, float]:
    from emoreason.eval.client import EndpointClient

    def client(concurrency: int) -> EndpointClient:
        return EndpointClient(url, "tiny", concurrency=concurrency, max_retries=2, backoff=0.1, timeout=600)

    common = dict(temperature=1.0, max_tokens=max_tokens)
    c1, c8 = client(1), client(8)
    # Warm-up: first calls pay one-off costs (allocations, lazy imports) that should not count.
    await c8.chat(messages=messages(clips[0]), n=2, **common)

    times = {"sc8_one_request": 0.0, "sc8_eight_sequential": 0.0, "sc8_eight_concurrent": 0.0,
             "items_concurrency_1": 0.0, "items_concurrency_8": 0.0}
    for r in range(repeats):
        clip = clips[r % len(clips)]
        times["sc8_one_request"] += await timed(c8.chat(messages=messages(clip), n=8, **common))

        async def sequential():
            for _ in range(8):
                await c1.chat(messages=messages(clip), n=1, **common)

        times["sc8_eight_sequential"] += await timed(sequential())
        times["sc8_eight_concurrent"] += await timed(asyncio.gather(
            *(c8.chat(messages=messages(clip), n=1, **common) for _ in range(8))))
        times["items_concurrency_1"] += await timed(asyncio.gather(
            *(c1.chat(messages=messages(c), **common) for c in clips)))
        times["items_concurrency_8"] += await timed(asyncio.gather(
            *(c8.chat(messages=messages(c), **common) for c in clips)))
    await c1.close()
    await c8.close()
    times["retries"] = c1.stats["retries"] + c8.stats["retries"]  # should be 0: a retry would distort the timings
    return times


async def items_rate(url: str, clips: list[dict], max_tokens: int, repeats: int) -> dict[int, float]:
    """Items/s at concurrency 1 and 8: each clip once, sampled, one answer per item (the evaluator's direct mode)."""
    from emoreason.eval.client import EndpointClient

    rates = {}
    for concurrency in (1, 8):
        client = EndpointClient(url, "tiny", concurrency=concurrency, max_retries=2, backoff=0.1, timeout=600)
        await client.chat(messages=messages(clips[0]), n=1, temperature=1.0, max_tokens=max_tokens)  # warm-up
        seconds = 0.0
        for _ in range(repeats):
            seconds += await timed(asyncio.gather(*(client.chat(messages=messages(c), temperature=1.0,
                                                                max_tokens=max_tokens) for c in clips)))
        await client.close()
        rates[concurrency] = repeats * len(clips) / seconds
    return rates


def find_vllm_bin(explicit: str | None) -> str | None:
    from emoreason.serve.vllm_launcher import VllmNotFoundError, find_vllm

    try:
        return find_vllm(explicit)
    except VllmNotFoundError:
        return None


def start_vllm(model_dir, vllm_bin: str, log_path: Path, timeout: float = 1200.0) -> tuple[subprocess.Popen, str]:
    """``emoreason serve --backend vllm`` on a free port with the CPU settings of docs/vllm.md; (process, base URL)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "emoreason.serve.vllm_launcher", "--model", str(model_dir), "--port", str(port),
               "--served-model-name", "tiny", "--dtype", "float32", "--vllm-bin", vllm_bin, "--max-model-len", "2048",
               "--vllm-arg=--enforce-eager", "--health-timeout", str(timeout)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "PYTHONUNBUFFERED": "1"}
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout + 30
    while time.monotonic() < deadline:
        match = re.search(r"healthy at (http://\S+/v1)", log_path.read_text(errors="replace"))
        if match:
            return process, match.group(1)
        if process.poll() is not None:
            break
        time.sleep(2)
    process.kill()
    raise RuntimeError(f"vLLM did not start; its log:\n{log_path.read_text()[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: build the tiny model)")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num-threads", type=int, default=1,
                        help="torch threads for generation (1: stable on shared CPUs)")
    parser.add_argument("--vllm", choices=["auto", "on", "off"], default="auto",
                        help="also measure vLLM (auto: when a vLLM environment is found)")
    parser.add_argument("--vllm-bin", default=os.environ.get("EMOREASON_VLLM_BIN"))
    args = parser.parse_args(argv)

    from emoreason.serve.app import create_app
    from emoreason.serve.background import BackgroundServer
    from emoreason.serve.engine import TransformersEngine

    vllm_bin = None if args.vllm == "off" else find_vllm_bin(args.vllm_bin)
    if args.vllm == "on" and vllm_bin is None:
        print("--vllm on: no vLLM environment found (make test-vllm builds .venv-vllm)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from emoreason.testing.tiny import build_tiny_model

            model_dir = build_tiny_model(Path(tmp) / "tiny")
        engine = TransformersEngine.from_pretrained(model_dir, max_batch_rows=16, num_threads=args.num_threads)
        app = create_app(engine, "tiny")
        clips = make_clips(args.items)
        with BackgroundServer(app) as server:
            times = asyncio.run(run(server.url + "/v1", clips, args.max_tokens, args.repeats))
            builtin_rates = asyncio.run(items_rate(server.url + "/v1", clips, args.max_tokens, args.repeats))
        vllm_rates = None
        if vllm_bin:
            process, url = start_vllm(model_dir, vllm_bin, Path(tmp) / "vllm.log")
            try:
                vllm_rates = asyncio.run(items_rate(url, clips, args.max_tokens, args.repeats))
            finally:
                process.terminate()
                process.wait(timeout=60)
    print(f"built-in server, tiny model, max_tokens={args.max_tokens}, {args.items} items, {args.repeats} repeats, "
          f"{args.num_threads} torch thread(s) for generation")
    retries = times.pop("retries")
    for name, seconds in times.items():
        print(f"  {name:<22} {seconds:8.2f} s")
    print(f"  client retries: {retries}")
    print(f"self-consistency@8: 8 sequential requests / one n=8 request  = "
          f"{times['sc8_eight_sequential'] / times['sc8_one_request']:.2f}x")
    print(f"self-consistency@8: 8 concurrent requests / one n=8 request  = "
          f"{times['sc8_eight_concurrent'] / times['sc8_one_request']:.2f}x")
    print(f"{args.items} items: concurrency 1 / concurrency 8              = "
          f"{times['items_concurrency_1'] / times['items_concurrency_8']:.2f}x")
    print(f"items/s (sampled, max_tokens={args.max_tokens}):   concurrency 1   concurrency 8")
    print(f"  built-in server                        {builtin_rates[1]:8.2f}        {builtin_rates[8]:8.2f}")
    if vllm_rates is None:
        print("  vLLM: not measured (no vLLM environment; `make test-vllm` builds the CPU one)")
        return 0
    print(f"  vLLM (CPU engine, --enforce-eager)     {vllm_rates[1]:8.2f}        {vllm_rates[8]:8.2f}")
    print(f"  vLLM / built-in                        {vllm_rates[1] / builtin_rates[1]:8.2f}x       "
          f"{vllm_rates[8] / builtin_rates[8]:8.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
