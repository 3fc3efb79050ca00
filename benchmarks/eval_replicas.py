"""Evaluator throughput over 1, 2 and 4 replicas of the built-in server (tiny model, CPU, loopback), one run.

Starts 4 ``emoreason serve`` processes of the same checkpoint on 127.0.0.1 (one torch thread each), then sends the
same items (distinct clips, one sampled answer each, no cache) through the evaluator's endpoint pool
(``emoreason.eval.endpoints``: least outstanding work, ``--concurrency`` requests in flight per replica) to the first
1, 2 and 4 of them. The configurations are measured in the order 1, 2, 4, 4, 2, 1 and summed, so that a change of
load on a shared machine during the run weighs on all of them alike.

    python benchmarks/eval_replicas.py [--items 24] [--max-tokens 24] [--concurrency 4] [--model DIR]

Prints items/s per replica count and the ratios to one replica (>1 = faster). Replicas only help when there are cores
(or GPUs) for them: on a machine with C free cores, expect at most about min(N, C) times one replica.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from emoreason.testing.server import ServeProcess, stop_all

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_throughput import make_clips, messages  # noqa: E402


async def measure(urls: list[str], clips: list[dict], max_tokens: int, concurrency: int) -> tuple[float, dict]:
    from emoreason.eval.endpoints import make_client

    client = make_client(urls if len(urls) > 1 else urls[0], "tiny", concurrency=concurrency, max_retries=2,
                         backoff=0.1, timeout=600)
    common = dict(temperature=1.0, max_completion_tokens=max_tokens)
    # Warm-up: one request per replica (first calls pay one-off costs), not timed.
    for url in urls:
        warm = make_client(url, "tiny", concurrency=1, timeout=600)
        await warm.chat(messages=messages(clips[0]), seed=12345, **common)
        await warm.close()
    start = time.perf_counter()
    await asyncio.gather(*(client.chat(messages=messages(c), seed=i, **common) for i, c in enumerate(clips)))
    seconds = time.perf_counter() - start
    await client.close()
    return seconds, dict(client.stats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: build the tiny model)")
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight per replica")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args(argv)

    servers: list[ServeProcess] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from emoreason.testing.tiny import build_tiny_model

            model_dir = build_tiny_model(Path(tmp) / "tiny")
        try:
            for i in range(max(args.replicas)):  # all started at once, then waited for: their loads overlap
                servers.append(ServeProcess(model_dir, "tiny", log=Path(tmp) / f"replica{i}.log", num_threads=1,
                                            health_timeout=300).launch())
            for server in servers:
                server.wait_healthy()
            base = [server.url for server in servers]
            clips = make_clips(args.items)
            seconds = {n: 0.0 for n in args.replicas}
            spread = {}
            for n in list(args.replicas) + list(reversed(args.replicas)):
                took, stats = asyncio.run(measure(base[:n], clips, args.max_tokens, args.concurrency))
                seconds[n] += took
                if "endpoints" in stats:
                    spread[n] = [e["answered"] for e in stats["endpoints"].values()]
        finally:
            stop_all(servers)
    rates = {n: 2 * args.items / s for n, s in seconds.items()}
    print(f"built-in server replicas (tiny model, 1 torch thread each, loopback), {args.items} items x 2 passes, "
          f"max_tokens={args.max_tokens}, {args.concurrency} in flight per replica, {os.cpu_count()} CPU(s)")
    for n in args.replicas:
        answered = f"  answered per replica (last pass): {spread[n]}" if n in spread else ""
        print(f"  {n} replica(s): {rates[n]:7.2f} items/s   {rates[n] / rates[args.replicas[0]]:5.2f}x "
              f"{args.replicas[0]} replica{answered}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
