"""Launching SFT the ways the docs show: `accelerate launch` on 2 CPU ranks, DeepSpeed ZeRO-2 / ZeRO-3 on CPU,
`emoreason train sft`, and resuming from a checkpoint. A handful of steps each, with the feature cache off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny-cpu" / "sft.yaml"

def _env() -> dict[str, str]:
    env = os.environ.copy()
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR")
               or str(Path(tempfile.gettempdir()) / "emoreason-torch-extensions"))
    return env


def _overrides(tiny_model_dir, synth_corpus, out: Path, steps: int) -> list[str]:
    return ["--config", str(RECIPE), "--model_name_or_path", str(tiny_model_dir), "--train_records", str(synth_corpus),
            "--data_root", str(synth_corpus.parent), "--output_dir", str(out), "--max_steps", str(steps),
            "--per_device_train_batch_size", "2", "--tasks", "emotion_label,transcription", "--logging_steps", "1",
            "--save_strategy", "no", "--label_accuracy_split", "", "--feature_cache_dir", "", "--disable_tqdm", "true", "--max_train_records", "24"]


def _launch(config: str, args: list[str], timeout: int = 480) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / config),
           "-m", "emoreason.train.sft", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _results(out: Path) -> dict:
    return json.loads((out / "all_results.json").read_text())


def _losses(out: Path) -> dict[int, float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


@pytest.mark.slow
@pytest.mark.parametrize("config", ["cpu_2proc.yaml", "cpu_zero2.yaml", "cpu_zero3.yaml"])
def test_accelerate_launch_trains_on_two_ranks(config, tiny_model_dir, synth_corpus, tmp_path):
    out = tmp_path / "run"
    # ZeRO-3 also scores the label task after training: a forward pass there is collective across ranks.
    scoring = ["--label_accuracy_split", "test"] if "zero3" in config else []
    _launch(config, _overrides(tiny_model_dir, synth_corpus, out, steps=3) + scoring)
    results = _results(out)
    assert results["world_size"] == 2
    if scoring:
        assert 0.0 <= results["label_accuracy"] <= 1.0
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3] and all(v == v and v > 0 for v in losses.values())
    from emoreason.modeling import load_pretrained

    model, _ = load_pretrained(out)  # the saved model (gathered from ZeRO-3 shards) loads as a checkpoint
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.slow
def test_emoreason_train_cli_and_resume_continue_steps_and_loss(tiny_model_dir, synth_corpus, tmp_path):
    def run(out: Path, steps: int, *extra: str) -> None:
        args = _overrides(tiny_model_dir, synth_corpus, out, steps)
        args[args.index("--save_strategy") + 1] = "steps"
        cmd = [sys.executable, "-m", "emoreason.cli", "train", "sft", *args, "--save_steps", "2", *extra]
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=480)
        assert proc.returncode == 0, proc.stderr[-6000:]

    straight = tmp_path / "straight"
    run(straight, 6)
    resumed = tmp_path / "resumed"
    run(resumed, 4)
    assert (resumed / "checkpoint-4").is_dir()
    run(resumed, 6)  # same output_dir: picks up checkpoint-4 by itself
    losses = _losses(resumed)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    expected = _losses(straight)
    for step in (5, 6):  # same data order and RNG state after resuming: the same losses as an uninterrupted run
        assert losses[step] == pytest.approx(expected[step], rel=1e-4), (losses, expected)


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").glob("*/sft.yaml")))
def test_every_sft_recipe_parses_with_overrides(recipe, tmp_path):
    from emoreason.train.sft import make_parser

    # bf16 recipes are for GPUs; on this CPU the override is the only change.
    script_args, training_args, model_args = make_parser().parse_args_and_config(args=[
        "--config", str(REPO / recipe), "--data_root", str(tmp_path), "--output_dir", str(tmp_path / "out"),
        "--bf16", "false", "--use_cpu", "true", "--tasks", '{"emotion_label": {"weight": 2}, "prosody": {}}'])
    assert training_args.output_dir == str(tmp_path / "out") and script_args.data_root == str(tmp_path)
    assert training_args.tasks == {"emotion_label": {"weight": 2}, "prosody": {}}
    assert training_args.remove_unused_columns is False
    assert training_args.dataset_kwargs["skip_prepare_dataset"] is True
    assert model_args.model_name_or_path or (model_args.content_encoder and model_args.language_model)


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "accelerate_configs").glob("*.yaml")))
def test_accelerate_configs_load(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(REPO / "accelerate_configs" / config))
    assert loaded.num_processes >= 1
    if "zero" in config or config == "multi_node.yaml":
        assert loaded.deepspeed_config["zero3_init_flag"] is False  # models are built before ZeRO-3 partitions them
