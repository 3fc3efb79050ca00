"""`emoreason train {warmup,sft,grpo,dpo} --config recipes/<model>/<method>.yaml [--accelerate-config FILE] [overrides]`
and `emoreason cache-features --config recipes/<model>/sft.yaml [--shard_size N] [--cache_dtype DTYPE]`.

Without ``--accelerate-config`` the method runs in this process (one CPU/GPU). With it, the command becomes
``accelerate launch --config_file FILE -m emoreason.train.<method> ...``, the same launch the README shows.
``cache-features`` parses the same SFT recipe and fills its ``feature_cache_dir`` (:mod:`emoreason.train.feature_cache`).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

METHODS = {"sft": "emoreason.train.sft", "grpo": "emoreason.train.grpo", "dpo": "emoreason.train.dpo",
           "warmup": "emoreason.train.warmup"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in METHODS:
        print(f"usage: emoreason train {{{','.join(METHODS)}}} --config RECIPE.yaml [--accelerate-config FILE] "
              "[--field value ...]", file=sys.stderr)
        return 2
    module = METHODS[argv[0]]
    rest = argv[1:]
    if "--accelerate-config" in rest:
        i = rest.index("--accelerate-config")
        config_file = rest[i + 1]
        rest = rest[:i] + rest[i + 2 :]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file, "-m", module, *rest]
        print("+ " + " ".join(cmd), flush=True)
        return subprocess.call(cmd, env=os.environ.copy())
    return int(importlib.import_module(module).cli(rest) or 0)


def cache_features(argv: list[str] | None = None) -> int:
    """Parse the SFT recipe; encode the clips of its train/eval records and every task's records once."""
    import logging

    import torch

    from ..data.schema import read_records
    from .common import get_model, get_processor
    from .feature_cache import cache_features as write_cache
    from .sft import make_parser
    from .tasks import parse_task_specs

    argv = list(sys.argv[1:] if argv is None else argv)
    extra = {"--shard_size": 256, "--cache_dtype": None}
    for flag in list(extra):
        if flag in argv:
            i = argv.index(flag)
            extra[flag] = argv[i + 1]
            del argv[i : i + 2]
    script_args, training_args, model_args = make_parser().parse_args_and_config(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not training_args.feature_cache_dir:
        print("cache-features: set feature_cache_dir in the recipe or with --feature_cache_dir DIR", file=sys.stderr)
        return 2
    if model_args.train_content_encoder or model_args.train_paralinguistic_encoder:
        print("cache-features: the recipe trains an encoder; cached features would go stale", file=sys.stderr)
        return 2
    sources = [script_args.train_records, script_args.eval_records]
    sources += [s.records for s in parse_task_specs(training_args.tasks)]
    records = [r for src in dict.fromkeys(s for s in sources if s) for r in read_records(src)]
    processor = get_processor(model_args)
    model = get_model(model_args, processor)
    if torch.cuda.is_available():
        model = model.to("cuda")
    dtype = getattr(torch, extra["--cache_dtype"]) if extra["--cache_dtype"] else None
    folder = write_cache(model, processor, records, script_args.data_root, training_args.feature_cache_dir,
                         shard_size=int(extra["--shard_size"]), dtype=dtype)
    print(folder)
    return 0
