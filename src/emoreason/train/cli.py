"""`emoreason train {sft,grpo,dpo} --config recipes/<model>/<method>.yaml [--accelerate-config FILE] [overrides]`.

Without ``--accelerate-config`` the method runs in this process (one CPU/GPU). With it, the command becomes
``accelerate launch --config_file FILE -m emoreason.train.<method> ...``, the same launch the README shows.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

METHODS = {"sft": "emoreason.train.sft", "grpo": "emoreason.train.grpo", "dpo": "emoreason.train.dpo"}


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
