"""`emoreason demo` end to end (CI runs it at its tiny size): every stage, the report with every section and plot,
numbers that come from the run's own files, re-runs that skip finished stages, and a failing stage named."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from emoreason.demo.context import DemoContext, Stage, StageFailed, run_stages
from emoreason.demo.report import SECTIONS

REPO = Path(__file__).resolve().parents[1]


def run_demo(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "emoreason.cli", "demo", "--out", str(out), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reports_its_own_numbers(tmp_path):
    out = tmp_path / "demo"
    result = run_demo(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert f"report: {out / 'report.md'}" in result.stdout
    for section in SECTIONS:
        assert f"## {section}" in report, section
    for plot in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (out / plot).is_file() and (out / plot).stat().st_size > 1000, plot
    assert "plots/training.png" in report and "plots/accuracy_vs_tokens.png" in report

    # the numbers in the report are the ones the stages wrote
    sft = json.loads((out / "sft" / "all_results.json").read_text())
    assert f"label accuracy **{sft['label_accuracy']:.3f}**" in report
    assert sft["label_accuracy"] > sft["label_accuracy_silence"] + 0.2  # the model uses the audio
    controls = json.loads((out / "sft" / "controls.json").read_text())
    for condition, key in (("audio", "audio"), ("swapped audio", "swapped_audio"), ("silence", "silence"),
                           ("transcript only", "transcript_only")):
        assert f"| {condition} | {controls[key]:.3f} |" in report, condition
    assert controls["transcript_only"] <= 0.35 and controls["silence"] <= 0.35  # the corpus gives nothing away
    assert controls["audio"] > controls["swapped_audio"] + 0.2  # the answer follows the voice
    final = json.loads((out / "eval" / "dpo" / "report.json").read_text())
    for name, strategy in final["strategies"].items():
        accuracy = strategy["metrics"]["classification"]["accuracy"]
        assert re.search(rf"\| {name} \| {accuracy:.3f} \|", report), name
    # GRPO ran the trust-weighted reasoning reward; the report names the step its progressive switch turned it on
    grpo = json.loads((out / ".stages" / "grpo.json").read_text())
    assert any("reasoning/trust" in entry for entry in grpo["log"]) and "plots/grpo_reasoning.png" in report
    active = [entry["step"] for entry in grpo["log"] if entry.get("reasoning/active", 0) >= 0.5]
    assert (f"switched on at step {active[0]}" if active else "never switched on") in report
    summary = json.loads((out / "data" / "summary.json").read_text())
    assert f'"kept": {summary["kept"]}' in report
    # the warmed-up backbone wrote rationales that passed the filters, and SFT trained on them
    written = json.loads((out / "data-self" / "summary.json").read_text())
    assert written["teacher"]["name"] == "self" and written["kept"] >= written["inputs"] / 2, written
    sft_records = [json.loads(line) for line in (out / "data-self" / "sft-records.jsonl").read_text().splitlines()]
    self_written = [r for r in sft_records if r["meta"]["provenance"]["teacher"] == "self"]
    assert len(self_written) == written["kept"] and all(r["split"] == "train" for r in self_written)
    assert f"| {written['inputs']} |" in report and "Kept rationales, verbatim" in report
    assert self_written[0]["response"].strip() in report
    sft_info = json.loads((out / "sft" / "emoreason_training.json").read_text())
    assert sft_info["train_records"].endswith("sft-records.jsonl") and sft_info["model"].endswith("base-warm")
    for stage in ("corpus", "base", "datagen", "warmup", "self-teacher", "sft", "grpo", "dpo", "export", "evaluate", "report"):
        assert (out / ".stages" / f"{stage}.json").is_file(), stage

    # a re-run skips every finished stage
    again = run_demo(out)
    assert again.returncode == 0
    assert again.stdout.count("done before, skipped") == 11


def test_a_failing_stage_stops_the_demo_and_is_named(tmp_path, capsys):
    ran = []

    def ok(ctx):
        ran.append("first")
        return {"value": 1}

    def broken(ctx):
        raise StageFailed("command exited with status 3; full log: x.log")

    def never(ctx):
        ran.append("never")
        return {}

    stages = [Stage("first", "first step", ok), Stage("second", "second step", broken), Stage("third", "t", never)]
    ctx = DemoContext(out=tmp_path, repo=REPO, accelerate_config=tmp_path / "none.yaml")
    with pytest.raises(SystemExit, match="stage 'second' \\(second step\\) failed: command exited with status 3"):
        run_stages(stages, ctx)
    assert ran == ["first"]
    assert json.loads((tmp_path / ".stages" / "first.json").read_text())["value"] == 1
    assert not (tmp_path / ".stages" / "second.json").exists()
    # once fixed, the re-run resumes after the finished stage
    stages[1] = Stage("second", "second step", lambda ctx: {})
    run_stages(stages, ctx)
    assert ran == ["first", "never"]
    # --force redoes a stage and every one after it; --until stops early
    run_stages(stages, ctx, force="second", until="second")
    assert ran == ["first", "never"]
    with pytest.raises(SystemExit, match="unknown stage"):
        run_stages(stages, ctx, force="nope")


def test_demo_lists_its_stages():
    result = subprocess.run([sys.executable, "-m", "emoreason.cli", "demo", "--list"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == ["corpus", "base", "datagen", "warmup", "self-teacher", "sft", "grpo", "dpo", "export", "evaluate",
                     "report"]


def test_the_reward_rise_is_measured_against_the_step_to_step_noise():
    """The report's "standard errors" figure is Welch's t of the last quarter against the first (scipy's value),
    large for a real rise, small for noise alone, and absent when it cannot be measured."""
    import random

    from scipy import stats

    from emoreason.demo.report import rise_in_standard_errors

    rng = random.Random(0)
    noise = [(i, 1.4 + rng.gauss(0, 0.3)) for i in range(60)]
    rising = [(i, v + 0.01 * i) for i, v in noise]
    for points in (noise, rising):
        values = [v for _, v in points]
        expected = stats.ttest_ind(values[-15:], values[:15], equal_var=False).statistic
        assert abs(rise_in_standard_errors(points) - expected) < 1e-9
    assert abs(rise_in_standard_errors(noise)) < 2 < rise_in_standard_errors(rising)
    assert rise_in_standard_errors(noise[:7]) is None  # one value per quarter: no spread to measure
    assert rise_in_standard_errors([(i, 1.0) for i in range(20)]) is None  # no noise at all
