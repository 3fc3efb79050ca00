"""`emoreason serve --model PATH`: the OpenAI-compatible server.

``--backend transformers`` (default) is the built-in server for CPUs, development and tests; ``--backend vllm`` hands
the same arguments to vLLM (``emoreason.serve.vllm_launcher``), which needs a GPU and its own environment.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path


def _launch_transformers(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .background import bind_socket
    from .engine import TransformersEngine

    engine = TransformersEngine.from_pretrained(
        args.model, dtype=args.dtype, max_batch_rows=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000,
        num_threads=args.num_threads,
    )
    try:
        app = create_app(engine, model_name=args.served_model_name, api_key=args.api_key,
                         allowed_audio_root=args.allowed_audio_root, default_max_tokens=args.default_max_tokens,
                         max_body_bytes=int(args.max_body_mb * 2**20), max_audio_seconds=args.max_audio_seconds)
    except ValueError as err:
        print(f"emoreason serve: {err}", file=sys.stderr)
        return 2
    sock = bind_socket(args.host, args.port)
    host, port = sock.getsockname()[:2]
    # One parseable line, flushed, so scripts that start the server on port 0 learn the address.
    print(f"emoreason serve: {args.served_model_name!r} on http://{host}:{port}/v1", flush=True)
    # Keep-alive longer than clients idle between requests (a connection closed as it is reused fails a request).
    config = uvicorn.Config(app, log_level=args.log_level, lifespan="on", timeout_keep_alive=120)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _launch_vllm(args: argparse.Namespace) -> int:
    try:
        launcher = importlib.import_module("emoreason.serve.vllm_launcher")
    except ImportError as err:
        print(f"emoreason serve: the vLLM backend is unavailable ({err}); install vLLM in its own environment "
              "(see docs/serving.md) or use --backend transformers", file=sys.stderr)
        return 2
    return int(launcher.launch(args) or 0)


BACKENDS = {"transformers": _launch_transformers, "vllm": _launch_vllm}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emoreason serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder (save_pretrained output)")
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="transformers")
    parser.add_argument("--served-model-name", default=None, help="the name clients pass as `model` (default: "
                        "the checkpoint folder's name)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address; 0.0.0.0 exposes the server to the "
                        "network (set --api-key then)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on start)")
    parser.add_argument("--api-key", default=os.environ.get("EMOREASON_API_KEY"),
                        help="require `Authorization: Bearer KEY` (default: $EMOREASON_API_KEY, else none)")
    parser.add_argument("--allowed-audio-root", default=None,
                        help="folder that file:// audio URLs may point into (file:// is refused without it)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="most sequences (rows) per generate call")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="how long an idle server waits for more requests to batch with the first")
    parser.add_argument("--default-max-tokens", type=int, default=256,
                        help="completion budget when a request names none (lowered to what fits the context)")
    parser.add_argument("--max-body-mb", type=float, default=64.0,
                        help="largest request body in MiB (413 above it, refused before it is read or decoded)")
    parser.add_argument("--max-audio-seconds", type=float, default=None,
                        help="longest clip accepted (400 above it, never cut); default and ceiling: the model's "
                        "encoder window (30 s for Whisper)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--num-threads", type=int, default=None,
                        help="torch CPU threads for generation (default: torch's, one per core); 1 is much faster "
                        "on a CPU other jobs share")
    parser.add_argument("--log-level", default="info")
    try:  # the vLLM backend's own flags; its module is stdlib-only (vLLM runs as a child process)
        from .vllm_launcher import add_vllm_arguments
    except ImportError:
        pass
    else:
        add_vllm_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not Path(args.model).is_dir() and args.backend == "transformers":
        print(f"emoreason serve: no checkpoint folder at {args.model}", file=sys.stderr)
        return 2
    if args.allowed_audio_root is not None and not Path(args.allowed_audio_root).is_dir():
        print(f"emoreason serve: --allowed-audio-root {args.allowed_audio_root} is not a folder", file=sys.stderr)
        return 2
    args.served_model_name = args.served_model_name or Path(args.model).resolve().name
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return BACKENDS[args.backend](args)
