"""`emoreason export --merge`: a LoRA run becomes a standalone checkpoint with the same outputs, a processor and a card."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, synth_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora-sft") / "run"
    cmd = [sys.executable, "-m", "emoreason.cli", "train", "sft", "--config", "recipes/tiny-cpu/sft.yaml",
           "--model_name_or_path", str(tiny_model_dir), "--train_records", str(synth_corpus),
           "--data_root", str(synth_corpus.parent), "--output_dir", str(out), "--use_peft", "true", "--lora_r", "4",
           "--lora_alpha", "8", "--max_steps", "3", "--per_device_train_batch_size", "2", "--learning_rate", "5e-3",
           "--tasks", "emotion_label", "--save_strategy", "no", "--label_accuracy_split", "test",
           "--max_train_records", "12", "--disable_tqdm", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out


@pytest.mark.slow
def test_merged_export_matches_the_adapter_and_carries_a_card(lora_run, synth_corpus, tmp_path):
    from emoreason.train.collators import SFTCollator
    from emoreason.modeling import load_pretrained
    from emoreason.train.export import cli, load_checkpoint
    from emoreason.train.tasks import build_task_examples, parse_task_specs

    assert (lora_run / "adapter_config.json").is_file()  # adapter + projector, not a full copy
    out = tmp_path / "merged"
    assert cli([str(lora_run), "--output", str(out)]) == 2  # an adapter without --merge is refused
    assert cli([str(lora_run), "--merge", "--output", str(out)]) == 0
    assert not (out / "adapter_config.json").exists() and list(out.glob("*.safetensors"))

    adapter_model, processor = load_checkpoint(lora_run)
    merged, merged_processor = load_pretrained(out)
    rows = build_task_examples(parse_task_specs("emotion_label"), synth_corpus, split="test")[:2]
    batch = SFTCollator(merged_processor, synth_corpus.parent)(rows)
    with torch.no_grad():
        expected = adapter_model.eval()(**batch).logits
        got = merged.eval()(**batch).logits
    assert torch.allclose(expected, got, atol=1e-4)
    # the trained projector (saved with the adapter) is the one in the export, not the base's
    base, _ = load_pretrained(json.loads((lora_run / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert not torch.equal(base.get_audio_encoder().projector.linear_1.weight,
                           merged.get_audio_encoder().projector.linear_1.weight)

    card = (out / "README.md").read_text()
    assert "recipes/tiny-cpu/sft.yaml" in card and str(synth_corpus) in card and "label_accuracy" in card


def test_export_reports_a_missing_checkpoint(tmp_path, capsys):
    from emoreason.train.export import cli

    assert cli([str(tmp_path / "nope"), "--merge", "--output", str(tmp_path / "out")]) == 2
    assert "not a folder" in capsys.readouterr().err
