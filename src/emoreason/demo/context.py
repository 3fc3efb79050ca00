"""The demo's machinery: a stage, the run context (commands streamed to logs), the stage runner and the loopback server.

Stages run in order; each writes a marker when done, so a re-run skips finished stages (``--force STAGE`` redoes one and
everything after it). A failing stage stops the demo with a message naming it and the log to read. Every number in the
report is read from the files the stages wrote.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..testing.server import ServeProcess, ServerFailed

REPO = Path(__file__).resolve().parents[3]


class StageFailed(RuntimeError):
    pass


@dataclass
class Stage:
    name: str
    title: str
    run: Callable[[DemoContext], dict]
    outputs: tuple[str, ...] = ()  # folders under the run folder; cleared when the stage is forced


@dataclass
class DemoContext:
    out: Path
    repo: Path
    accelerate_config: Path
    quick: bool = False

    @property
    def corpus(self) -> Path:
        return self.out / "corpus"

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def sh(self, stage: str, cmd: list[str], env: dict | None = None, timeout: float | None = None) -> None:
        """Run a command, streaming its output to the terminal and to the stage's log file."""
        log = self.out / "logs" / f"{stage}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"  $ {shlex.join(str(c) for c in cmd)}", flush=True)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                    "HF_HUB_OFFLINE": "1", **(env or {})}
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"$ {shlex.join(str(c) for c in cmd)}\n")
            fh.flush()
            proc = subprocess.Popen([str(c) for c in cmd], cwd=self.repo, env=full_env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
            assert proc.stdout is not None
            shown_percent = -100
            for line in proc.stdout:
                fh.write(line)
                bar = _PROGRESS.search(line)
                if bar:  # progress bars redraw many times a second: show every quarter
                    percent = int(bar.group(1))
                    if percent < shown_percent or percent >= shown_percent + 25 or percent == 100:
                        shown_percent = percent
                        sys.stdout.write("    " + line.strip() + "\n")
                elif _worth_showing(line):
                    sys.stdout.write("    " + line)
            code = proc.wait(timeout=timeout)
        if code != 0:
            raise StageFailed(f"command exited with status {code}; full log: {log}")


_PROGRESS = re.compile(r"(\d+)%\|")


def _worth_showing(line: str) -> bool:
    quiet = ("Warning", "warn(", "FutureWarning", "UserWarning", "[WARNING]", "torch_dtype", "Loading weights")
    return bool(line.strip()) and not any(q in line for q in quiet)


def run_stages(stages: list[Stage], ctx: DemoContext, force: str | None = None,
               until: str | None = None) -> dict[str, dict]:
    markers = ctx.out / ".stages"
    markers.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in stages]
    for flag, value in (("--force", force), ("--until", until)):
        if value is not None and value not in names:
            raise SystemExit(f"{flag}: unknown stage {value!r}; stages: {', '.join(names)}")
    if until is not None:
        stages = stages[: names.index(until) + 1]
    if force is not None:
        for stage in stages[names.index(force):]:
            (markers / f"{stage.name}.json").unlink(missing_ok=True)
            for output in stage.outputs:  # a forced stage starts over: no resumed checkpoints, no cached answers
                shutil.rmtree(ctx.out / output, ignore_errors=True)
    results: dict[str, dict] = {}
    total = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        marker = markers / f"{stage.name}.json"
        header = f"[{i}/{len(stages)}] {stage.title}"
        if marker.exists():
            results[stage.name] = json.loads(marker.read_text())
            print(f"{header}: done before, skipped", flush=True)
            continue
        print(f"{header} ...", flush=True)
        start = time.perf_counter()
        try:
            result = stage.run(ctx) or {}
        except StageFailed as err:
            raise SystemExit(f"\ndemo stopped: stage '{stage.name}' ({stage.title}) failed: {err}") from None
        except Exception as err:  # a bug or bad input inside an in-process stage: name the stage, keep the trace
            import traceback

            traceback.print_exc()
            raise SystemExit(f"\ndemo stopped: stage '{stage.name}' ({stage.title}) failed: {err!r}") from None
        result["seconds"] = round(time.perf_counter() - start, 1)
        marker.write_text(json.dumps(result, indent=2))
        results[stage.name] = result
        print(f"{header}: done in {result['seconds']:.0f} s", flush=True)
    print(f"all stages done in {time.perf_counter() - total:.0f} s", flush=True)
    return results


class Server:
    """The built-in server on loopback for the evaluation stage (:class:`emoreason.testing.server.ServeProcess`);
    stopped on exit whatever happens."""

    def __init__(self, ctx: DemoContext, model: Path, name: str):
        # one generation thread leaves the other core to the evaluator's client
        self.process = ServeProcess(model, name, log=ctx.out / "logs" / "server.log", cwd=ctx.repo, num_threads=1,
                                    health_timeout=180, stop_timeout=20)

    @property
    def url(self) -> str:
        return self.process.url

    def __enter__(self) -> Server:
        print(f"  $ {shlex.join(self.process.command)}", flush=True)
        try:
            self.process.start()
        except ServerFailed as err:
            raise StageFailed(str(err)) from None
        return self

    def __exit__(self, *exc) -> None:
        self.process.stop()
