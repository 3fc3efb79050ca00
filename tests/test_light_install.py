"""The light evaluator: a fresh virtual environment with only the base install (no torch, transformers or deepspeed)
runs `emoreason eval` on a small suite against an OpenAI-compatible endpoint and writes the report.

The endpoint is the scripted test endpoint (emoreason.eval.scripted), served from this (full) environment; the light
environment only holds the client. It runs outside the source tree, so the metric modules must come from the
installed package. Needs PyPI or a pip cache holding the base requirements.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "deepspeed", "trl", "peft", "accelerate")
LABELS = ["neutral", "happy", "sad", "angry"]


@pytest.fixture(scope="module")
def light_env(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("light") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(REPO)],
                            capture_output=True, text=True, env=env, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return venv


def write_corpus(root: Path) -> tuple[Path, dict[str, str]]:
    from emoreason.data.audio import write_wav
    from emoreason.data.schema import EmotionRecord, write_records

    records, by_audio = [], {}
    for i, label in enumerate(LABELS * 2):
        t = np.arange(8000) / 16_000
        path = write_wav(root / "clips" / f"c{i}.wav", (0.2 * np.sin(2 * np.pi * (150 + 40 * i) * t)).astype(np.float32))
        by_audio[base64.b64encode(path.read_bytes()).decode()] = label
        records.append(EmotionRecord(id=f"c{i}", audio=f"clips/c{i}.wav", duration=0.5, corpus="synthetic",
                                     split="test", label=label, gender="female" if i % 2 else "male",
                                     distribution={label: 1.0}))
    return write_records(records, root / "records.jsonl"), by_audio


@pytest.mark.slow
def test_light_install_evaluates_without_the_training_stack(light_env, tmp_path):
    from emoreason.eval.scripted import create_scripted_app, last_user_text
    from emoreason.serve.background import BackgroundServer

    python = light_env / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import importlib.util, json, emoreason; print(json.dumps("
                            "{'file': emoreason.__file__, 'heavy': [m for m in %r if importlib.util.find_spec(m)]}))"
                            % (HEAVY,)], capture_output=True, text=True, cwd=tmp_path, check=True)
    found = json.loads(probe.stdout)
    assert found["heavy"] == [], f"the light install brought {found['heavy']}"
    assert str(light_env) in found["file"]  # the installed package, not the source tree

    records, by_audio = write_corpus(tmp_path / "corpus")

    def script(body):
        audio = next(p for p in body["messages"][-1]["content"] if p.get("type") == "input_audio")
        label = by_audio[audio["input_audio"]["data"]]
        if "emotion only" in last_user_text(body):
            return [f"<answer>{label}</answer>"] * body.get("n", 1)
        return [f"<think>The pitch is high.</think><answer>{label}</answer>"] * body.get("n", 1)

    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "light", "records": str(records), "split": "test", "labels": LABELS,
        "prompts": str(REPO / "eval/prompts/emotion.yaml"), "max_tokens": 16, "concurrency": 4, "retries": 1,
        "strategies": ["direct", "cot_greedy", {"name": "self_consistency", "n": 3}],
        "metrics": ["classification", "distribution", "calibration", "reasoning"], "group_by": ["gender"],
    }))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    with BackgroundServer(create_scripted_app(script, model="m")) as server:
        result = subprocess.run([str(light_env / "bin" / "emoreason"), "eval", "--suite", str(suite), "--endpoint",
                                 server.url + "/v1", "--model", "m", "--out", str(out), "--no-progress"],
                                capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["strategies"]) == {"direct", "cot_greedy", "self_consistency"}
    for name, strategy in report["strategies"].items():
        assert strategy["metrics"]["classification"]["accuracy"] == 1.0, name  # the script answers each label
    # Control: the same environment refuses what it lacks (the training stack is really absent).
    missing = subprocess.run([str(python), "-c", "import emoreason.train.sft"], capture_output=True, text=True,
                             cwd=tmp_path)
    assert missing.returncode != 0 and "No module named 'torch'" in missing.stderr
