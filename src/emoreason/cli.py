"""`emoreason <stage> ...`: one console script, one subcommand per stage.

Subcommands are looked up by name and imported only when run, so `emoreason --help` stays fast and a stage's heavy
imports (vLLM, DeepSpeed...) never load for another stage. Each target is a function taking the remaining argv.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "make-tiny": ("emoreason.testing.tiny:cli", "build and save a tiny complete model (tests, demo)"),
    "warmup-tower": ("emoreason.demo.prosody_tower:cli",
                     "prosody warm-up of a tiny model's random paralinguistic tower (tests, demo)"),
    "synth-corpus": ("emoreason.testing.synth_corpus:cli", "synthesise the espeak-ng emotional corpus"),
    "datagen": ("emoreason.datagen.cli:main", "corpora -> reasoning training records (rationales, filters, pairs)"),
    "train": ("emoreason.train.cli:main", "train: `emoreason train {warmup,sft,grpo,dpo} --config recipe.yaml`"),
    "cache-features": ("emoreason.train.cli:cache_features", "precompute frozen encoder outputs for training"),
    "export": ("emoreason.train.export:cli", "merge adapters into a standalone checkpoint"),
    "serve": ("emoreason.serve.cli:main", "OpenAI-compatible server (transformers or vLLM backend)"),
    "eval": ("emoreason.eval.cli:main", "evaluate an endpoint on a suite with test-time-scaling strategies"),
    "report": ("emoreason.eval.cli:report_main", "report pages: `emoreason report compare RUN_A RUN_B` (flips, "
               "paired differences), `emoreason report html RUN`"),
    "demo": ("emoreason.demo.cli:main", "the whole pipeline end to end on CPU"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: emoreason <command> [args...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"emoreason: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = SUBCOMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
