"""The data stage's `self` teacher through vLLM's offline ``LLM.generate`` (CPU engine) against the transformers backend.

Both runs are full `emoreason datagen` runs on the same few clips with greedy decoding: the transformers one in the
training environment, the vLLM one in this environment. The teacher's rationales, and so every filter decision, must
be the same. (This file sorts before test_engine.py, so its offline engine has exited before the served one starts.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, TRAIN_PYTHON, needs_engine, needs_train_env

pytestmark = [needs_engine, needs_train_env, pytest.mark.slow, pytest.mark.timeout(1800)]

LABELS = ["neutral", "happy", "sad", "angry", "happy"]
TRANSCRIPTS = ["The meeting starts at nine tomorrow morning.", "My brother bought a new bicycle.",
               "I saw the report on the table.", "Turn left after the second light.", "Dinner is ready in the kitchen."]


def write_corpus(folder) -> str:
    from emoreason.data.schema import EmotionRecord, Vote, write_records

    rng = np.random.default_rng(5)
    records = []
    for i, (label, text) in enumerate(zip(LABELS, TRANSCRIPTS)):
        seconds = 1.0 + 0.5 * i
        t = np.arange(int(16_000 * seconds)) / 16_000
        # Different pitch and loudness per clip, so the measured cue words (and so the prompts) differ.
        wave = (0.1 + 0.1 * i) * np.sin(2 * np.pi * (110 + 50 * i) * t * (1 + 0.2 * t))
        wave += 0.005 * rng.standard_normal(t.shape)
        sf.write(folder / f"clip{i}.wav", wave.astype(np.float32), 16_000)
        records.append(EmotionRecord(
            id=f"c{i}", audio=f"clip{i}.wav", duration=seconds, corpus="synthetic", split="train",
            speaker=f"s{i % 2}", gender="female" if i % 2 else "male", transcript=text, label=label,
            votes=[Vote(rater="r1", emotion=label), Vote(rater="r2", emotion=label)], distribution={label: 1.0}))
    return str(write_records(records, folder / "records.jsonl"))


def datagen(python: str, manifest: str, model, out, backend: str, extra=()) -> dict:
    command = [python, "-m", "emoreason.cli", "datagen", "--config", str(REPO / "data_gen/configs/synthetic.yaml"),
               "--manifest", manifest, "--out", str(out), "--teacher", "self", "--model", str(model), "--no-progress",
               "--set", f"teacher.backend={backend}", "--set", "teacher.temperature=0", "--set",
               "teacher.num_samples=1", "--set", "teacher.max_new_tokens=32", "--set", "write_parquet=false",
               "--set", "pairs.enabled=false", *extra]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines() if line.strip()]
    kept = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines() if line.strip()]
    return {"summary": json.loads((out / "summary.json").read_text()), "rejected": rejected, "kept": kept}


def decisions(run: dict) -> dict:
    """(record, sample) -> (decision, reason, the teacher's text)."""
    table = {(r["id"], r["sample"]): ("rejected", r["reason"], r["text"]) for r in run["rejected"]}
    for record in run["kept"]:
        table[(record["id"], record["meta"]["provenance"].get("sample", 0))] = ("kept", None, record["response"])
    return table


def test_vllm_teacher_makes_the_same_decisions_as_transformers(tiny_checkpoint, tmp_path):
    manifest = write_corpus(tmp_path)
    reference = datagen(str(TRAIN_PYTHON), manifest, tiny_checkpoint, tmp_path / "transformers", "transformers",
                        ["--set", "teacher.device=cpu"])
    kwargs = json.dumps({"enforce_eager": True, "dtype": "float32", "max_model_len": 2048, "seed": 0})
    served = datagen(sys.executable, manifest, tiny_checkpoint, tmp_path / "vllm", "vllm",
                     ["--set", f"teacher.vllm_kwargs={kwargs}"])
    want, got = decisions(reference), decisions(served)
    assert len(want) == len(LABELS)  # one greedy sample per clip, each kept or rejected with a reason
    assert got == want
    for key in ("inputs", "kept", "dropped"):
        assert served["summary"][key] == reference["summary"][key]
    # Control: the texts are the LLM's (non-empty, and the prompts steer them: they are not all alike), so equal
    # tables mean equal generations, not two backends that both returned nothing.
    texts = [text for _, _, text in want.values()]
    assert all(text.strip() for text in texts) and len(set(texts)) >= 3
    assert (tmp_path / "vllm" / "teacher_lm" / "config.json").is_file()  # the LM vLLM loaded, exported from ours
