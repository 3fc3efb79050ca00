"""`emoreason datagen --config data_gen/configs/<corpus>.yaml [overrides]`.

Overrides, for the demo and quick runs (each also settable as ``--set key=value``, nested keys with dots):
  --manifest PATH     the corpus manifest (synthetic/manifest adapters); the data root defaults to its folder
  --data-root DIR     corpus.root
  --out DIR           output_dir
  --teacher NAME      teacher.name (template | self | openai)
  --model PATH        teacher.model (self: an EmoReason checkpoint or an LLM; openai: the served model name)
  --limit N           generate for a deterministic subset of N clips
  --executor NAME     local (default: this machine) | ray (Ray Data over a cluster; docs/data.md "Ray")
  --ray-address ADDR  ray.address: a running cluster ("auto", HOST:PORT); default a local Ray on 127.0.0.1
  --set key=value     any config key, e.g. --set teacher.num_samples=4 --set filters.answer_must_match=consensus
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emoreason datagen", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--config", help="YAML config (data_gen/configs/<corpus>.yaml)")
    parser.add_argument("--manifest")
    parser.add_argument("--data-root")
    parser.add_argument("--out")
    parser.add_argument("--teacher")
    parser.add_argument("--model")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--executor", choices=("local", "ray"))
    parser.add_argument("--ray-address")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from pathlib import Path

    from ..data.corpora import CorpusError
    from ..data.schema import RecordError
    from .config import ConfigError, load_config
    from .pipeline import run
    from .teachers import TeacherUnavailable

    overrides = []
    if args.manifest:
        overrides.append(f"corpus.options.manifest={json.dumps(str(Path(args.manifest).resolve()))}")
        if not args.data_root:
            overrides.append(f"corpus.root={json.dumps(str(Path(args.manifest).resolve().parent))}")
    if args.data_root:
        overrides.append(f"corpus.root={json.dumps(args.data_root)}")
    if args.out:
        overrides.append(f"output_dir={json.dumps(args.out)}")
    if args.teacher:
        overrides.append(f"teacher.name={args.teacher}")
    if args.model:
        overrides.append(f"teacher.model={json.dumps(args.model)}")
    if args.limit is not None:
        overrides.append(f"limit={args.limit}")
    if args.executor:
        overrides.append(f"executor={args.executor}")
    if args.ray_address:
        overrides.append(f"ray.address={json.dumps(args.ray_address)}")
    if args.no_progress:
        overrides.append("progress=false")
    try:
        cfg = load_config(args.config, overrides + args.overrides)
        summary = run(cfg)
    except (ConfigError, CorpusError, RecordError, FileNotFoundError, ValueError, TeacherUnavailable) as err:
        print(f"emoreason datagen: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    if summary.get("teacher_failures"):
        print(f"emoreason datagen: {summary['teacher_failures']} teacher request(s) failed after retries; those "
              "clips are in rejected.jsonl (reason teacher_error)", file=sys.stderr)
    return 0
