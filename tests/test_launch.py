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


def test_one_sft_step_in_process(tiny_model_dir, synth_corpus, tmp_path):
    """The smoke step `make test-newest` runs on the newest transformers: the SFT entry point, one optimizer step."""
    from emoreason.train.sft import cli

    out = tmp_path / "one-step"
    assert cli(_overrides(tiny_model_dir, synth_corpus, out, steps=1) + ["--use_cpu", "true", "--bf16", "false"]) == 0
    losses = _losses(out)
    assert list(losses) == [1] and 0 < losses[1] < 100
    assert (out / "model.safetensors").is_file() and (out / "processor_config.json").is_file()


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


# -- slurm/train.slurm from a fresh clone, with stub `srun` and `scontrol` -------------------------------------------
SRUN_STUB = """#!/bin/bash
# srun --ntasks-per-node=1 on SLURM_NNODES nodes: the command once per node, each with its SLURM_PROCID and its own
# log (task-N.log). The options srun got are recorded. All "nodes" share one loopback address here, so the others
# start once node 0 listens on MASTER_PORT (on real nodes each host has its own ports and the order does not matter).
echo "$*" > "$SRUN_LOG_DIR/srun-args"
while [ $# -gt 0 ] && [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
  if [ "$i" = 1 ] && [ -z "${DRY_RUN:-}" ]; then
    for ((t = 0; t < 600; t++)); do
      (echo > "/dev/tcp/127.0.0.1/$MASTER_PORT") 2>/dev/null && break
      sleep 1
    done
  fi
  SLURM_PROCID=$i "$@" > "$SRUN_LOG_DIR/task-$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
SCONTROL_STUB = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] || exit 1
echo node-a; echo node-b
"""


def fresh_clone(dest: Path) -> Path:
    """The tracked files a clone gets (as they are in the working tree): no logs/, no build outputs."""
    listed = subprocess.run(["git", "ls-files", "-z", "slurm", "accelerate_configs", "recipes"], cwd=REPO,
                            capture_output=True, text=True)
    files = [f for f in listed.stdout.split("\0") if f] if listed.returncode == 0 else []
    if not files:  # not a git checkout (an unpacked sdist): the same folders
        files = [str(p.relative_to(REPO)) for d in ("slurm", "accelerate_configs", "recipes")
                 for p in (REPO / d).rglob("*") if p.is_file()]
    import shutil

    for name in files:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    return dest


def submit(clone: Path, args: list[str], nodes: int, tmp_path: Path, timeout: int = 60,
           **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    """Run slurm/train.slurm as sbatch would on ``nodes`` nodes (submit folder = the clone), stubs on PATH."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN_STUB), ("scontrol", SCONTROL_STUB)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    logs = tmp_path / "srun-logs"
    logs.mkdir(exist_ok=True)
    full_env = _env()
    full_env.update(PATH=f"{stubs}:{Path(sys.executable).parent}:{full_env['PATH']}", SLURM_NNODES=str(nodes),
                    SLURM_JOB_NODELIST="node-[a-b]", SLURM_SUBMIT_DIR=str(clone), SRUN_LOG_DIR=str(logs), **env)
    for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "NNODES", "GPUS_PER_NODE", "METHOD", "DRY_RUN",
                 "ACCELERATE_CONFIG"):
        if name not in env:
            full_env.pop(name, None)
    proc = subprocess.run(["bash", str(clone / "slurm" / "train.slurm"), *args], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, logs


def test_slurm_script_builds_one_launch_per_node_from_a_fresh_clone(tmp_path):
    import re
    import shlex

    from accelerate.commands.launch import launch_command_parser

    clone = fresh_clone(tmp_path / "clone")
    assert not (clone / "logs").exists()
    # sbatch opens --output before the script runs: its folder must exist in the submit folder of a fresh clone.
    output = re.search(r"^#SBATCH --output=(\S+)", (clone / "slurm" / "train.slurm").read_text(), re.M).group(1)
    assert (clone / Path(output).parent).is_dir(), output

    tasks = '{"emotion_label": {"weight": 2}, "prosody": {}}'  # a JSON override with spaces: one argument
    proc, logs = submit(clone, ["recipes/qwen2.5-7b-whisper-wavlm/sft.yaml", "--tasks", tasks,
                                "--run_name", "a b"], nodes=2, tmp_path=tmp_path, DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    assert "--kill-on-bad-exit=1" in (logs / "srun-args").read_text()
    parser = launch_command_parser()
    for rank in (0, 1):
        argv = shlex.split((logs / f"task-{rank}.log").read_text())
        assert argv[:2] == ["accelerate", "launch"]
        launch = parser.parse_args(argv[2:])  # every flag is one accelerate knows
        assert (launch.num_machines, launch.num_processes, launch.machine_rank) == (2, 16, rank)
        assert (launch.main_process_ip, launch.main_process_port) == ("node-a", 29500)
        assert (clone / launch.config_file).is_file() and launch.config_file.endswith("multi_node.yaml")
        assert launch.module and launch.training_script == "emoreason.train.sft"
        script_args = launch.training_script_args
        assert script_args[script_args.index("--tasks") + 1] == tasks
        assert script_args[script_args.index("--run_name") + 1] == "a b"
        assert (clone / script_args[script_args.index("--config") + 1]).is_file()

    # Controls: no recipe, an unknown method and a missing recipe are refused before anything starts.
    for args, env in (([], {}), (["recipes/tiny-cpu/sft.yaml"], {"METHOD": "ppo"}), (["recipes/none.yaml"], {})):
        proc, _ = submit(clone, args, nodes=2, tmp_path=tmp_path, DRY_RUN="1", **env)
        assert proc.returncode != 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_slurm_launch_runs_two_machines_on_loopback(tiny_model_dir, synth_corpus, tmp_path):
    """The accelerate command slurm/train.slurm builds, run for real as 2 machines x 1 process (machine_rank 0 and 1,
    main_process_ip 127.0.0.1, c10d rendezvous, gloo on CPU, DeepSpeed ZeRO-2): both finish with the same losses."""
    import ast

    out = tmp_path / "run"
    proc, logs = submit(REPO, ["recipes/tiny-cpu/sft.yaml", *_overrides(tiny_model_dir, synth_corpus, out, steps=3)[2:]],
                        nodes=2, tmp_path=tmp_path, timeout=900, ACCELERATE_CONFIG="accelerate_configs/cpu_zero2.yaml",
                        GPUS_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    task_logs = [(logs / f"task-{rank}.log").read_text() for rank in (0, 1)]
    assert proc.returncode == 0, proc.stderr[-2000:] + "\n".join(t[-4000:] for t in task_logs)

    def logged(text: str) -> list[dict]:  # the trainer's log lines ({'loss': ...}), printed by each machine's rank 0
        return [ast.literal_eval(line) for line in text.splitlines() if line.startswith("{'")]

    per_machine = [logged(text) for text in task_logs]
    losses = [[float(e["loss"]) for e in entries if "loss" in e] for entries in per_machine]
    finals = [[float(e["train_loss"]) for e in entries if "train_loss" in e] for entries in per_machine]
    assert len(losses[0]) == 3 and losses[0] == losses[1], losses
    assert len(finals[0]) == 1 and finals[0] == finals[1], finals
    assert _results(out)["world_size"] == 2  # one process group across both machines, not two 1-process runs
    assert sorted(_losses(out)) == [1, 2, 3]


def test_multi_node_config_uses_zero2_for_lora():
    import yaml

    config = yaml.safe_load((REPO / "accelerate_configs" / "multi_node.yaml").read_text())
    assert config["distributed_type"] == "DEEPSPEED" and config["deepspeed_config"]["zero_stage"] == 2


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "accelerate_configs").glob("*.yaml")))
def test_accelerate_configs_load(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(REPO / "accelerate_configs" / config))
    assert loaded.num_processes >= 1
    if "zero" in config or config == "multi_node.yaml":
        assert loaded.deepspeed_config["zero3_init_flag"] is False  # models are built before ZeRO-3 partitions them
