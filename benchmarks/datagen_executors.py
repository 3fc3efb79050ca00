"""Datagen throughput of the local executor vs the Ray executor on this machine, one run.

Renders the espeak-ng corpus, then runs `emoreason datagen` (acoustic pass + template teacher + filters + pairs, all
clips) with each executor into fresh folders, in the order local, ray, ray, local, and sums the times so that a
change of load on a shared machine weighs on both alike:

* local: ``acoustic.workers`` processes for the acoustic pass, generation in the driver;
* ray: a local Ray on 127.0.0.1 (dashboard off) with the same number of CPUs, ``ray.acoustic_actors`` and
  ``ray.teacher_actors`` equal to it. Ray's start (``ray.init``) is timed apart: a cluster runs many jobs.

    python benchmarks/datagen_executors.py [--cpus 2] [--sentences-per-speaker 8] [--corpus-dir DIR]

Prints clips/s of both and the ratio Ray / local (>1 = Ray faster), and checks that both wrote the same records.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray's addresses on 127.0.0.1

REPO = Path(__file__).resolve().parents[1]


def config(out: Path, corpus: Path, executor: str, cpus: int):
    from emoreason.datagen.config import load_config

    return load_config(REPO / "data_gen" / "configs" / "synthetic.yaml", [
        f"corpus.options.manifest={json.dumps(str(corpus))}", f"corpus.root={json.dumps(str(corpus.parent))}",
        f"output_dir={json.dumps(str(out))}", "progress=false", f"executor={executor}", "shard_size=32",
        "acoustic.shard_size=32", f"acoustic.workers={cpus}", f"ray.acoustic_actors={cpus}",
        f"ray.teacher_actors={cpus}"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--sentences-per-speaker", type=int, default=8)
    parser.add_argument("--corpus-dir", default=None, help="reuse (or keep) the rendered corpus here")
    args = parser.parse_args(argv)

    import ray

    from emoreason.datagen import pipeline
    from emoreason.testing.synth_corpus import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        corpus = synthesize(Path(args.corpus_dir or Path(tmp) / "corpus"),
                            sentences_per_speaker=args.sentences_per_speaker)
        clips = sum(1 for _ in open(corpus))
        start = time.perf_counter()
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=args.cpus,
                 log_to_driver=False)
        ray_start = time.perf_counter() - start
        try:
            seconds = {"local": 0.0, "ray": 0.0}
            for i, executor in enumerate(("local", "ray", "ray", "local")):
                out = Path(tmp) / f"{executor}-{i}"
                start = time.perf_counter()
                summary = pipeline.run(config(out, corpus, executor, args.cpus))
                seconds[executor] += time.perf_counter() - start
                assert summary["complete"] and summary["inputs"] == clips
            same = all((Path(tmp) / "local-0" / name).read_bytes() == (Path(tmp) / "ray-1" / name).read_bytes()
                       for name in ("records.jsonl", "pairs.jsonl", "rejected.jsonl"))
        finally:
            ray.shutdown()
    rates = {name: 2 * clips / s for name, s in seconds.items()}
    print(f"datagen, {clips} clips (acoustic + template teacher + filters + pairs) x 2 passes, {args.cpus} CPU(s) "
          f"for each executor, {os.cpu_count()} on the machine")
    print(f"  local executor: {rates['local']:7.1f} clips/s")
    print(f"  Ray executor:   {rates['ray']:7.1f} clips/s  (Ray's start, once: {ray_start:.1f} s, not counted)")
    print(f"  Ray / local:    {rates['ray'] / rates['local']:7.2f}x   outputs byte-identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
