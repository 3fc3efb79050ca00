"""`emoreason demo` (and `make demo`): the whole pipeline end to end on a CPU, at a size a laptop runs.

Stages run in order; each writes a marker when done, so a re-run skips finished stages (``--force STAGE`` redoes one and
everything after it). A failing stage stops the demo with a message naming it and the log to read. Every number in the
report is read from the files the stages wrote.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from .context import REPO, DemoContext, Stage, run_stages


def build_stages() -> list[Stage]:
    from .stages import STAGES

    return STAGES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emoreason demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    parser.add_argument("--force", metavar="STAGE", help="redo this stage and every stage after it")
    parser.add_argument("--until", metavar="STAGE", help="stop after this stage")
    parser.add_argument("--fresh", action="store_true", help="delete the run folder first")
    parser.add_argument("--accelerate-config", default=str(REPO / "accelerate_configs" / "cpu_2proc.yaml"),
                        help="accelerate config the training stages launch with (default: 2 CPU processes)")
    parser.add_argument("--list", action="store_true", help="list the stages and exit")
    args = parser.parse_args(argv)
    stages = build_stages()
    if args.list:
        for stage in stages:
            print(f"{stage.name:12s} {stage.title}")
        return 0
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(out=out, repo=REPO, accelerate_config=Path(args.accelerate_config).resolve())
    run_stages(stages, ctx, force=args.force, until=args.until)
    report = out / "report.md"
    if report.exists():
        print(f"\nreport: {report}")
    return 0
