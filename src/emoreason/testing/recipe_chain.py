"""Run a GPU recipe folder as written: SFT from parts -> GRPO -> DPO -> ``export --merge`` (-> serve -> eval).

Each stage is the command a user launches (``accelerate launch -m emoreason.train.<method> --config
recipes/<model>/<method>.yaml``, ``emoreason export``, ``emoreason serve``, ``emoreason eval``), with the recipe's own
settings: parts, LoRA, ``attn_implementation``, tasks, rewards, schedules. Only what a machine or a test must change
is overridden, and every override is listed in :data:`ALLOWED_OVERRIDES` so a reader sees what was not as written:
the part paths (random stand-ins, :mod:`.recipe_parts`), the data paths, the output folders, the device and dtype,
step counts and batch/length sizes, and the judge's address.

Used by the recipe-chain test (tiny widths on a CPU) and by ``scripts/gpu_smoke.py`` (the real shapes on a GPU),
which prints :func:`format_table` of the :class:`StageResult` rows.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .server import ServeProcess, ServerFailed

METHODS = ("sft", "grpo", "dpo")
# What a chain may override; anything else reaches the trainer as the recipe wrote it.
ALLOWED_OVERRIDES = frozenset({
    # where things are
    "content_encoder", "paralinguistic_encoder", "language_model", "model_name_or_path", "train_records",
    "eval_records", "data_root", "output_dir",
    # the machine
    "use_cpu", "bf16", "dtype",
    # steps and sizes
    "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "max_completion_length", "max_length", "num_generations", "feature_norm_clips", "dataloader_num_workers",
    "logging_steps",
    # the judge's address (reward_kwargs with only judge_options.base_url changed) or, where no judge is served,
    # the heuristic judge
    "reward_kwargs",
    # the rollout engine (scripts/gpu_smoke.py runs GRPO once with HF generate and once with colocated vLLM)
    "use_vllm", "vllm_mode",
})


# Steps and sizes for a chain at tiny widths on a CPU (the recipe-chain test, `scripts/gpu_smoke.py --small`): a
# handful of steps, short completions, a small feature-norm fit; everything else as the recipe writes it.
CPU_SIZES: dict[str, dict[str, Any]] = {
    "sft": {"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
            "per_device_eval_batch_size": 2, "feature_norm_clips": 8, "logging_steps": 1},
    "grpo": {"max_steps": 1, "per_device_train_batch_size": 4, "num_generations": 4, "gradient_accumulation_steps": 1,
             "max_completion_length": 16, "logging_steps": 1},
    "dpo": {"max_steps": 1, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "logging_steps": 1},
}


@dataclass
class StageResult:
    stage: str
    seconds: float
    steps: int | None = None
    tokens: int | None = None
    peak_memory_gb: float | None = None
    mfu: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def steps_per_second(self) -> float | None:
        runtime = self.detail.get("train_runtime")
        return self.steps / runtime if self.steps and runtime else None

    @property
    def tokens_per_second(self) -> float | None:
        runtime = self.detail.get("train_runtime")
        return self.tokens / runtime if self.tokens and runtime else None


class StageFailed(RuntimeError):
    pass


def head_records(src: str | Path, dst: str | Path, n: int) -> Path:
    """The first ``n`` lines of a records file (an evaluation set of a chain's size)."""
    lines = [line for line in Path(src).read_text().splitlines() if line.strip()][:n]
    Path(dst).write_text("\n".join(lines) + "\n")
    return Path(dst)


def load_recipe(path: str | Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(Path(path).read_text()) or {}


def _flag_value(value: Any) -> list[str]:
    if isinstance(value, (dict, list)) and not isinstance(value, str):
        return [json.dumps(value)]
    if isinstance(value, bool):
        return [str(value).lower()]
    return [str(value)]


def override_args(overrides: dict[str, Any]) -> list[str]:
    unknown = sorted(set(overrides) - ALLOWED_OVERRIDES)
    if unknown:
        raise ValueError(f"recipe chain: {unknown} are recipe settings, not sizes/paths/device; run them as written")
    args: list[str] = []
    for key, value in overrides.items():
        args += [f"--{key}", *_flag_value(value)]
    return args


def judge_kwargs_at(recipe: dict[str, Any], base_url: str | None) -> dict[str, Any] | None:
    """The recipe's ``reward_kwargs`` with the judge moved to ``base_url`` (None: the heuristic judge instead), or
    None when the recipe has no remote judge."""
    kwargs = json.loads(json.dumps(recipe.get("reward_kwargs") or {}))
    reasoning = kwargs.get("reasoning") or {}
    if reasoning.get("judge") != "openai":
        return None
    if base_url is None:
        reasoning = {k: v for k, v in reasoning.items() if k != "judge_options"}
        reasoning["judge"] = "cue_heuristic"
    else:
        reasoning["judge_options"] = {**reasoning.get("judge_options", {}), "base_url": base_url}
    kwargs["reasoning"] = reasoning
    return kwargs


class Chain:
    """One recipe folder's chain in ``work``; stages run in order, each as a subprocess with its own timeout."""

    def __init__(self, recipe_dir: str | Path, work: str | Path, data: dict[str, Path], *, device: str = "cpu",
                 sizes: dict[str, dict[str, Any]] | None = None, python: str = sys.executable,
                 repo: str | Path | None = None, peak_tflops: float | None = None, stage_timeout: float = 900,
                 env: dict[str, str] | None = None):
        self.recipe_dir = Path(recipe_dir)
        self.work = Path(work)
        self.data = data  # records, pairs, data_root; optional eval_records (SFT), test_records (eval)
        self.device = device
        self.sizes = sizes or {}
        self.python = python
        self.repo = Path(repo) if repo else Path.cwd()
        self.peak_tflops = peak_tflops
        self.stage_timeout = stage_timeout
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.results: list[StageResult] = []
        (self.work / "logs").mkdir(parents=True, exist_ok=True)

    # -- running ----------------------------------------------------------------------------------------------
    def out(self, name: str) -> Path:
        return self.work / name

    def recipe(self, method: str) -> Path:
        return self.recipe_dir / f"{method}.yaml"

    def device_args(self) -> dict[str, Any]:
        if self.device == "cpu":
            return {"use_cpu": True, "bf16": False, "dtype": "float32"}
        return {}  # on a GPU the recipe's own dtype (bf16) stands

    def run(self, stage: str, cmd: Sequence[str], timeout: float | None = None) -> float:
        log = self.work / "logs" / f"{stage}.log"
        start = time.perf_counter()
        with open(log, "w", encoding="utf-8") as fh:
            fh.write(f"$ {shlex.join(map(str, cmd))}\n")
            fh.flush()
            proc = subprocess.Popen([str(c) for c in cmd], cwd=self.repo, env=self.env, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout=timeout or self.stage_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise StageFailed(f"{stage}: no result in {timeout or self.stage_timeout:.0f} s; log {log}") from None
        print(f"[chain] {self.recipe_dir.name} {stage}: {time.perf_counter() - start:.1f} s (exit {code})", flush=True)
        if code != 0:
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
            raise StageFailed(f"{stage} exited with status {code}; log {log}:\n{tail}")
        return time.perf_counter() - start

    def launch(self, method: str) -> list[str]:
        mixed = "no" if self.device == "cpu" else "bf16"
        return [self.python, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", mixed, "--dynamo_backend", "no", *(["--cpu"] if self.device == "cpu" else []),
                "-m", f"emoreason.train.{method}", "--config", str(self.recipe(method))]

    def train(self, method: str, model: dict[str, Any], records: Path, extra: dict[str, Any] | None = None,
              n_params: int | None = None, name: str | None = None) -> StageResult:
        name = name or method
        out = self.out(name)
        overrides = {**model, "train_records": records, "data_root": self.data["data_root"], "output_dir": out,
                     **self.device_args(), **self.sizes.get(method, {}), **(extra or {})}
        if method == "sft":  # SFT evaluates on eval_records at the end of its steps: a small file keeps that short
            overrides.setdefault("eval_records", self.data.get("eval_records", records))
        seconds = self.run(name, [*self.launch(method), *override_args(overrides)])
        result = StageResult(name, seconds, **self._training_figures(out, n_params))
        self.results.append(result)
        return result

    def _training_figures(self, out: Path, n_params: int | None) -> dict[str, Any]:
        results = json.loads((out / "all_results.json").read_text())
        state = json.loads((out / "trainer_state.json").read_text())
        tokens = max((int(e["num_tokens"]) for e in state.get("log_history", []) if "num_tokens" in e),
                     default=None)
        tokens = tokens or state.get("num_input_tokens_seen") or None
        figures: dict[str, Any] = {"steps": state.get("global_step"), "tokens": tokens,
                                   "peak_memory_gb": results.get("peak_gpu_memory_gb"),
                                   "detail": {k: results[k] for k in ("train_runtime", "train_loss") if k in results}}
        runtime = results.get("train_runtime")
        if n_params and tokens and runtime and self.peak_tflops:
            # model FLOP utilisation as usually reported (6 x parameters x tokens for a training step), counted for
            # the language model the tokens go through; the frozen towers' forward is not counted
            figures["mfu"] = 6 * n_params * tokens / runtime / (self.peak_tflops * 1e12)
        return figures

    # -- the chain ----------------------------------------------------------------------------------------------
    def sft(self, parts: dict[str, Path], n_params: int | None = None) -> StageResult:
        return self.train("sft", {k: str(v) for k, v in parts.items()}, self.data["records"], n_params=n_params)

    def grpo(self, judge_url: str | None, n_params: int | None = None, extra: dict | None = None,
             name: str = "grpo") -> StageResult:
        extra = dict(extra or {})
        kwargs = judge_kwargs_at(load_recipe(self.recipe("grpo")), judge_url)
        if kwargs is not None:
            extra["reward_kwargs"] = kwargs
        return self.train("grpo", {"model_name_or_path": self.out("sft")}, self.data["records"], extra,
                          n_params=n_params, name=name)

    def dpo(self, n_params: int | None = None) -> StageResult:
        return self.train("dpo", {"model_name_or_path": self.out("grpo")}, self.data["pairs"], n_params=n_params)

    def export(self) -> StageResult:
        seconds = self.run("export", [self.python, "-m", "emoreason.cli", "export", self.out("dpo"), "--merge",
                                      "--output", self.out("export")])
        result = StageResult("export", seconds)
        self.results.append(result)
        return result

    @contextlib.contextmanager
    def server(self, model: Path, name: str, api_key: str | None = None,
               health_timeout: float = 240) -> Iterator[str]:
        """``emoreason serve`` (the built-in server) on a free loopback port; yields its /v1 URL; always stopped."""
        server = ServeProcess(model, name, log=self.work / "logs" / f"serve-{name}.log", python=self.python,
                              cwd=self.repo, env=self.env, api_key=api_key, num_threads=1,
                              health_timeout=health_timeout)
        try:
            server.start()
        except ServerFailed as err:
            raise StageFailed(str(err)) from None
        try:
            yield server.url
        finally:
            server.stop()

    def evaluate(self, suite: str | Path, url: str, name: str, limit: int, max_tokens: int,
                 strategies: Sequence[str], api_key: str | None = None) -> StageResult:
        out = self.out("eval")
        cmd = [self.python, "-m", "emoreason.cli", "eval", "--suite", str(suite), "--endpoint", url, "--model", name,
               "--out", out, "--records", self.data["test_records"], "--data-root", self.data["data_root"],
               "--limit", str(limit), "--max-tokens", str(max_tokens), "--strategies", *strategies, "--no-progress",
               *(["--api-key", api_key] if api_key else [])]
        seconds = self.run("eval", cmd)
        result = StageResult("eval", seconds, detail={"report": str(out / "report.json")})
        self.results.append(result)
        return result


def format_table(rows: Sequence[StageResult]) -> str:
    """stage | seconds | steps/s | tokens/s | peak GPU memory | MFU, one line a stage (a dash where not measured)."""

    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = ["| stage | seconds | steps/s | tokens/s | peak GPU memory (GB) | MFU |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.stage} | {r.seconds:.1f} | {cell(r.steps_per_second, '.3f')} | "
                     f"{cell(r.tokens_per_second, ',.0f')} | {cell(r.peak_memory_gb, '.1f')} | "
                     f"{cell(None if r.mfu is None else 100 * r.mfu, '.1f')}{'' if r.mfu is None else '%'} |")
    return "\n".join(lines)
