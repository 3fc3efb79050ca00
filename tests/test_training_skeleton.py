"""SFT, GRPO and DPO end through one save path (train.common.train_and_save): every run writes its training info, so
an exported GRPO or DPO checkpoint's model card names its method and settings (SFT's is covered by test_export)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_grpo import reasoning_records

from emoreason.data.schema import write_records
from emoreason.train.common import TRAINING_INFO_FILE, recipe_path
from emoreason.train.export import model_card

REPO = Path(__file__).resolve().parents[1]


def test_recipe_path_reads_both_spellings():
    assert recipe_path(["--config", "r.yaml", "--x", "1"]) == "r.yaml"
    assert recipe_path(["--x", "1", "--config=r.yaml"]) == "r.yaml"
    assert recipe_path(["--x", "1"]) is None


def test_model_card_lines_follow_the_method():
    grpo = model_card({"method": "grpo", "reward_funcs": ["format", "accuracy"], "reward_weights": [1.0, 2.0],
                       "beta": 0.04}, "run")
    assert "- method: grpo" in grpo and "- rewards: format, accuracy (weights [1.0, 2.0])" in grpo
    assert "tasks:" not in grpo
    sft = model_card({"method": "sft", "tasks": ["emotion_label"], "task_schedule": "round_robin"}, "run")
    assert "- tasks: emotion_label (schedule: round_robin)" in sft and "rewards" not in sft
    assert "- method: unknown" in model_card({}, "run")


@pytest.fixture(scope="module")
def rl_files(synth_corpus, tmp_path_factory):
    records, pairs = reasoning_records(synth_corpus)
    out = tmp_path_factory.mktemp("skeleton")
    return write_records(records, out / "records.jsonl"), write_records(pairs, out / "pairs.jsonl"), synth_corpus.parent


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "dpo"])
def test_rl_runs_write_training_info_and_export_says_the_method(method, tiny_model_dir, rl_files, tmp_path):
    from emoreason.train.cli import main
    from emoreason.train.export import export

    records_file, pairs_file, data_root = rl_files
    recipe = REPO / f"recipes/tiny-cpu/{method}.yaml"
    out = tmp_path / method
    common = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), "--data_root", str(data_root),
              "--max_steps", "1", "--save_strategy", "no", "--max_train_records", "4", "--report_to", "none"]
    if method == "grpo":
        extra = ["--train_records", str(records_file), "--per_device_train_batch_size", "4", "--num_generations", "4",
                 "--max_completion_length", "8"]
    else:
        extra = ["--train_records", str(pairs_file), "--per_device_train_batch_size", "2"]
    assert main([method, "--config", str(recipe), *common, *extra]) == 0

    info = json.loads((out / TRAINING_INFO_FILE).read_text())
    assert info["method"] == method and info["recipe"] == str(recipe)
    assert info["metrics"]["train_examples"] > 0 and "train_runtime" in info["metrics"]
    if method == "grpo":
        assert info["reward_funcs"]
    else:
        assert info["beta"] > 0
    assert json.loads((out / "all_results.json").read_text())["train_examples"] == info["metrics"]["train_examples"]

    exported = export(out, tmp_path / f"{method}-export")
    card = (exported / "README.md").read_text()
    assert f"- method: {method}" in card and str(recipe) in card and "method: unknown" not in card
    assert json.loads((exported / TRAINING_INFO_FILE).read_text())["method"] == method


def test_sft_grpo_and_dpo_build_their_datasets_through_one_helper(monkeypatch):
    """One rule for the three methods (train.common.get_datasets): train_records of train_split ('all' keeps every
    record); a separate eval_records file is read whole; otherwise train_records of eval_split; no eval set when the
    run does not evaluate."""
    from types import SimpleNamespace

    from emoreason.train import common, dpo, grpo, sft

    calls = []

    def rows(path, split, limit):
        calls.append((path, split, limit))
        return [{"id": f"{path}:{split}"}]

    script = SimpleNamespace(train_records="train.jsonl", eval_records=None, max_train_records=7)
    args = SimpleNamespace(train_split="all", eval_split="validation", eval_strategy="steps")
    train, evaluation = common.get_datasets(script, args, rows)
    assert calls == [("train.jsonl", None, 7), ("train.jsonl", "validation", None)] and len(evaluation) == 1
    calls.clear()
    common.get_datasets(SimpleNamespace(**{**vars(script), "eval_records": "dev.jsonl"}),
                        SimpleNamespace(**{**vars(args), "train_split": "train"}), rows)
    assert calls == [("train.jsonl", "train", 7), ("dev.jsonl", None, None)]
    calls.clear()
    assert common.get_datasets(script, SimpleNamespace(**{**vars(args), "eval_strategy": "no"}), rows)[1] is None
    for module in (sft, grpo, dpo):  # each entry point goes through it
        assert "get_datasets" in vars(module)
    assert {f.name for f in __import__("dataclasses").fields(grpo.EmoReasonGRPOConfig)} >= {"train_split", "eval_split"}
    assert {f.name for f in __import__("dataclasses").fields(dpo.EmoReasonDPOConfig)} >= {"train_split", "eval_split"}
