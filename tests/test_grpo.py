"""GRPO: audio reaches generation and the loss, the reward rises on the tiny model, the entry point runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pytest
import torch

from emoreason.data.schema import write_records
from emoreason.testing.grpo_recipe import (  # noqa: F401  (other test modules import reasoning_records from here)
    MIN_RISE_STANDARD_ERRORS,
    describe,
    grpo_options,
    reasoning_records,
    rise,
    run_learning_recipe,
    synthetic_cues,
)
from emoreason.train.collators import SFTCollator


# -- fixtures -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rl_records(synth_corpus, tmp_path_factory):
    """(reasoning records file, pairs file, data root) built from the synthetic corpus."""
    records, pairs = reasoning_records(synth_corpus)
    out = tmp_path_factory.mktemp("rl-records")
    return write_records(records, out / "records.jsonl"), write_records(pairs, out / "pairs.jsonl"), synth_corpus.parent


def make_trainer(model_dir, records_file, data_root, tmp_path, reward_funcs=("format", "accuracy"), n_prompts=2,
                 **config):
    from emoreason.modeling import load_pretrained
    from emoreason.train.grpo import EmoReasonGRPOConfig, load_examples
    from emoreason.train.grpo_trainer import AudioGRPOTrainer
    from emoreason.train.rewards import get_reward_funcs

    model, processor = load_pretrained(model_dir)
    rows = load_examples(str(records_file), str(data_root), "train", max_records=max(n_prompts, 8))
    args = EmoReasonGRPOConfig(**grpo_options(tmp_path, reward_funcs, **config))
    trainer = AudioGRPOTrainer(model=model, reward_funcs=get_reward_funcs(args.reward_funcs, args.reward_kwargs),
                               args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=processor)
    return trainer, rows


# -- audio reaches generation and the loss ------------------------------------------------------------------------
def test_audio_reaches_generation_and_the_grpo_loss(tiny_model_dir, rl_records, tmp_path):
    from emoreason.train.grpo_trainer import MissingAudioError

    records_file, _, data_root = rl_records
    trainer, rows = make_trainer(tiny_model_dir, records_file, data_root, tmp_path, beta=0.04)
    model, processor = trainer.model, trainer.processing_class
    seen = {}
    generate = model.generate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return generate(*args, **kwargs)

    model.generate = spy
    model.train()
    inputs = [rows[0], rows[0], rows[1], rows[1]]  # two prompts x num_generations, as the sampler repeats them
    batch = trainer._generate_and_score_completions(inputs)

    # Generation got the clips, one per row, and prompts with each clip's placeholders expanded.
    assert seen["input_features"].shape[0] == 4 and seen["input_values"].shape[0] == 4
    expected = processor.num_audio_tokens(int(seen["input_values_mask"][0].sum()))
    assert int((batch["prompt_ids"][0] == processor.audio_token_id).sum()) == expected
    # The batch carries the audio for the loss, row-aligned with the completions (and the reference pass used it).
    assert batch["input_features"].shape[0] == batch["completion_ids"].shape[0] == 4
    assert "ref_per_token_logps" in batch

    def logps_and_loss(audio_batch):
        trainer._audio_batch = {k: audio_batch[k] for k in ("input_features", "input_features_mask",
                                                             "input_values", "input_values_mask")}
        ids = torch.cat([audio_batch["prompt_ids"], audio_batch["completion_ids"]], 1)
        mask = torch.cat([audio_batch["prompt_mask"], audio_batch["completion_mask"]], 1)
        with torch.no_grad():
            logps, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, ids.shape[1]
                                                                      - audio_batch["prompt_ids"].shape[1])
        trainer._audio_batch = None
        return logps, trainer._compute_loss(model, audio_batch)

    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test bypasses
    batch["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5])
    logps, _ = logps_and_loss(batch)
    batch["old_per_token_logps"] = logps  # so that the loss value, not only its gradient, depends on the log-probs
    logps_same, loss_same = logps_and_loss(batch)
    other = dict(batch)
    generator = torch.Generator().manual_seed(0)  # the same clip lengths, different sounds
    other["input_features"] = torch.randn(batch["input_features"].shape, generator=generator) \
        * batch["input_features_mask"][:, None, :]
    other["input_values"] = torch.randn(batch["input_values"].shape, generator=generator) * batch["input_values_mask"]
    logps_other, loss_other = logps_and_loss(other)
    assert torch.allclose(logps, logps_same)
    assert not torch.allclose(logps, logps_other)
    assert abs(loss_other.item() - loss_same.item()) > 1e-6

    # The gradient of the loss flows into the projector: the audio is part of the graph.
    model.zero_grad()
    loss_other.backward()
    projector = model.get_audio_encoder().projector
    projector_grad = sum(p.grad.abs().sum() for p in projector.parameters() if p.grad is not None)
    assert projector_grad > 0

    # Rows with placeholders but no audio are refused instead of silently training without the clip.
    text_only = {k: v for k, v in batch.items() if not k.startswith("input_")}
    with pytest.raises(MissingAudioError):
        trainer._compute_loss(model, text_only)


# -- recipes --------------------------------------------------------------------------------------------------------
RECIPE_MODELS = ("tiny-cpu", "qwen2.5-7b-whisper-wavlm", "llama3.1-8b-whisper-hubert")


@pytest.mark.parametrize("model", RECIPE_MODELS)
def test_grpo_recipes_parse_and_build_their_rewards(model, tmp_path):
    from emoreason.train.grpo import make_parser
    from emoreason.train.rewards import get_reward_funcs

    recipe = Path(__file__).resolve().parents[1] / "recipes" / model / "grpo.yaml"
    script, training, model_args = make_parser().parse_args_and_config(
        ["--config", str(recipe), "--data_root", str(tmp_path), "--use_cpu", "true", "--bf16", "false",
         "--output_dir", str(tmp_path / "out")])
    assert len(training.reward_weights) == len(training.reward_funcs)
    funcs = get_reward_funcs(training.reward_funcs, training.reward_kwargs)  # an OpenAI judge's client calls nothing yet
    assert [f.__name__ for f in funcs] == training.reward_funcs
    assert model_args.model_name_or_path
    weights = dict(zip(training.reward_funcs, training.reward_weights))
    if model != "tiny-cpu":  # the literature split: 0.3 format + 1.0 outcome + 0.5 trust-weighted reasoning
        assert (weights["format"], weights["accuracy"], weights["reasoning"]) == (0.3, 1.0, 0.5)
        assert training.beta > 0 and model_args.use_peft


def test_grpo_config_rejects_unknown_rewards_and_mismatched_weights(tmp_path):
    from emoreason.train.grpo import EmoReasonGRPOConfig

    with pytest.raises(ValueError, match="unknown reward"):
        EmoReasonGRPOConfig(output_dir=str(tmp_path), reward_funcs=["format", "vibes"], use_cpu=True)
    with pytest.raises(ValueError, match="reward_weights"):
        EmoReasonGRPOConfig(output_dir=str(tmp_path), reward_funcs=["format"], reward_weights=[1.0, 2.0],
                            use_cpu=True)


@pytest.mark.parametrize("setting, reason", [
    ({"vllm_mode": "server"}, "server.*cannot carry audio"),
    ({"vllm_tensor_parallel_size": 2}, "tensor_parallel_size > 1 cannot carry audio"),
    ({"vllm_enable_sleep_mode": True}, "sleep_mode cannot be used with audio"),
])
def test_vllm_configurations_that_would_drop_the_audio_are_refused_with_the_reason(tmp_path, setting, reason):
    # Colocate rollouts with one engine per rank carry the clips (tests_vllm/test_grpo_vllm.py); these cannot.
    from emoreason.train.grpo import EmoReasonGRPOConfig
    from emoreason.train.grpo_trainer import AudioGRPOTrainer
    from emoreason.train.vllm_rollouts import audio_vllm_refusal

    args = EmoReasonGRPOConfig(output_dir=str(tmp_path), use_vllm=True, use_cpu=True, bf16=False, **setting)
    with pytest.raises(ValueError, match=reason):
        AudioGRPOTrainer(model=object(), reward_funcs=[], args=args)
    assert audio_vllm_refusal(EmoReasonGRPOConfig(output_dir=str(tmp_path), use_vllm=True, use_cpu=True,
                                                  bf16=False)) is None  # colocate, one engine per rank


# -- the entry point under accelerate launch (2 CPU processes; DeepSpeed ZeRO-2 on CPU) -------------------------------
REPO = Path(__file__).resolve().parents[1]
LAUNCH_CONFIGS = {"ddp": "accelerate_configs/cpu_2proc.yaml", "zero2": "accelerate_configs/cpu_zero2.yaml"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(method: str, launch_config: str, overrides: list[str], timeout: int = 600) -> None:
    """`accelerate launch --config_file <launch_config> -m emoreason.train.<method> --config recipes/tiny-cpu/...`
    with overrides, the way the README and the demo run it; fails with the tail of its output."""
    import os
    import subprocess
    import sys
    import tempfile

    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(tempfile.gettempdir()) / "emoreason-torch-extensions"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / launch_config),
           "--main_process_port", str(free_port()), "-m", f"emoreason.train.{method}",
           "--config", str(REPO / f"recipes/tiny-cpu/{method}.yaml"), *overrides]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"{' '.join(cmd)}\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("launch_config", sorted(LAUNCH_CONFIGS))
def test_grpo_entry_point_under_accelerate_launch(launch_config, tiny_model_dir, rl_records, tmp_path):
    import json

    records_file, _, data_root = rl_records
    out = tmp_path / "grpo"
    launch("grpo", LAUNCH_CONFIGS[launch_config], [
        "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), "--train_records", str(records_file),
        "--data_root", str(data_root), "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--num_generations", "4", "--max_completion_length", "8", "--save_strategy", "no", "--max_train_records", "8",
    ])
    assert (out / "model.safetensors").is_file() and (out / "processor_config.json").is_file()
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "reward" in h] == [1, 2]
    assert all("rewards/cue_grounding/mean" in h and "reasoning/trust" in h for h in history if "reward" in h)


@pytest.mark.slow
def test_grpo_resumed_under_zero2_continues_the_reasoning_schedule(tiny_model_dir, rl_records, tmp_path):
    """The real DeepSpeed path (ZeRO-2, 2 CPU processes): a run saved at step 1 and resumed to step 2 must count 2
    schedule updates; transformers skips ``_load_from_checkpoint`` there, so a restore that lived in it started the
    schedule over (measured before the fix: checkpoint-2 held ``steps: 1``). ~10 s a launch once DeepSpeed's CPU op
    is compiled."""
    records_file, _, data_root = rl_records
    out = tmp_path / "grpo"
    common = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), "--train_records",
              str(records_file), "--data_root", str(data_root), "--per_device_train_batch_size", "4",
              "--num_generations", "4", "--max_completion_length", "8", "--save_strategy", "steps", "--save_steps", "1",
              "--save_total_limit", "3", "--max_train_records", "8"]
    launch("grpo", LAUNCH_CONFIGS["zero2"], [*common, "--max_steps", "1"])
    first = json.loads((out / "checkpoint-1" / "reward_state.json").read_text())["reasoning"]["schedule"]
    assert first["steps"] == 1 and (out / "checkpoint-1" / "latest").is_file()  # a ZeRO checkpoint
    launch("grpo", LAUNCH_CONFIGS["zero2"], [*common, "--max_steps", "2", "--resume_from_checkpoint", "true"])
    assert json.loads((out / "checkpoint-2" / "reward_state.json").read_text())["reasoning"]["schedule"]["steps"] == 2


# -- learning: GRPO raises the mean reward ------------------------------------------------------------------------
@pytest.mark.slow
def test_grpo_raises_the_mean_reward(tiny_model_dir, rl_records, tmp_path):
    """Format + length (the tiny model learns to close its answer sooner): the reward on a fixed set of prompts
    rises from before to after a short GRPO run (emoreason.testing.grpo_recipe, shared with the vLLM colocate test
    in tests_vllm/test_grpo_vllm.py). With the tiny LM at head_dim 32 (2 heads, vLLM's CPU kernels' minimum) 12
    steps at 1e-3 moved it only -0.56 -> -0.51, and 24 steps at 1e-3 rose on 1 thread but not on 2; 24 steps at
    3e-3 reach 0.00 on 1 and on 2 threads."""
    records_file, _, data_root = rl_records
    result = run_learning_recipe(make_trainer, SFTCollator, tiny_model_dir, records_file, data_root, tmp_path)
    print(f"GRPO (HF generate): {describe(result)}")
    assert result["after"]["eval_reward"] > result["before"]["eval_reward"] + 0.2
    curve = rise(result["curve"])  # and the training reward, beyond its step-to-step noise
    assert curve.last - curve.first > MIN_RISE_STANDARD_ERRORS * curve.noise


def fitted_sft_adapter(base_dir, out_dir) -> Path:
    """What SFT leaves behind: a LoRA adapter whose projector copy holds *fitted* (non-identity) feature-normalisation
    statistics, on a base checkpoint saved before the fit (identity statistics)."""
    from emoreason.modeling import load_pretrained
    from emoreason.modeling.lora import apply_lora

    model, _ = load_pretrained(base_dir)
    projector = model.model.audio_encoder.projector
    assert not projector.feature_norm_fitted  # the saved base keeps identity statistics
    g = torch.Generator().manual_seed(0)
    projector.set_feature_stats(torch.randn(projector.content_mean.shape, generator=g),
                                torch.rand(projector.content_std.shape, generator=g) + 0.5,
                                torch.randn(projector.paralinguistic_mean.shape, generator=g),
                                torch.rand(projector.paralinguistic_std.shape, generator=g) + 0.5, frames=1234)
    apply_lora(model, r=4, alpha=8).save_pretrained(out_dir)
    return Path(out_dir)


def projector_states(model) -> dict[str, dict[str, torch.Tensor]]:
    """{adapter name or "base": projector state dict (parameters and buffers)} of a PEFT model."""
    wrapper = model.get_base_model().model.audio_encoder.projector
    states = {name: module.state_dict() for name, module in wrapper.modules_to_save.items()}
    states["base"] = wrapper.original_module.state_dict()
    return states


def assert_reference_projector_is_the_policys(model) -> None:
    states = projector_states(model)
    policy, reference, base = states["default"], states["ref"], states["base"]
    assert policy.keys() == reference.keys() and "content_mean" in policy and "feature_norm_frames" in policy
    assert int(policy["feature_norm_frames"]) == 1234
    # Control: the base projector differs from the policy's (identity statistics), so equality below is not vacuous.
    assert not torch.equal(base["content_std"], policy["content_std"])
    for key in policy:
        assert torch.equal(reference[key], policy[key]), f"reference projector {key} differs from the policy's"


def test_grpo_starts_from_an_sft_adapter_with_the_adapter_as_reference(tiny_model_dir, rl_records, tmp_path):
    """Real recipes start from a LoRA adapter folder: it loads onto its base, keeps training, and the KL reference is
    the adapter's frozen copy (no second model), projector normalisation statistics included: KL is 0 at step 0."""
    from emoreason.train.common import EmoReasonModelArguments, get_model, get_processor
    from emoreason.train.grpo import EmoReasonGRPOConfig, load_examples
    from emoreason.train.grpo_trainer import AudioGRPOTrainer
    from emoreason.train.rewards import get_reward_funcs

    records_file, _, data_root = rl_records
    fitted_sft_adapter(tiny_model_dir, tmp_path / "adapter")
    model_args = EmoReasonModelArguments(model_name_or_path=str(tmp_path / "adapter"))
    model, processor = get_model(model_args), get_processor(model_args)
    rows = load_examples(str(records_file), str(data_root), "train", max_records=2)
    args = EmoReasonGRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2,
                               max_completion_length=8, max_steps=1, report_to="none", use_cpu=True, bf16=False,
                               save_strategy="no", beta=0.04, reward_funcs=["format", "accuracy"])
    trainer = AudioGRPOTrainer(model=model, reward_funcs=get_reward_funcs(args.reward_funcs), args=args,
                               train_dataset=datasets.Dataset.from_list(rows), processing_class=processor)
    assert trainer.ref_model is None and "ref" in model.peft_config  # TRL's frozen copy of the SFT adapter
    assert_reference_projector_is_the_policys(model)
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    trainer.train()
    # The reference pass ran (KL logged) through the adapter's frozen copy, equal to the policy at the start.
    assert [h["kl"] for h in trainer.state.log_history if "kl" in h] == [0.0]


SCHEDULE_OPTIONS = dict(reward_funcs=("format", "accuracy", "reasoning"), max_steps=1, save_strategy="steps",
                        save_steps=1, reward_kwargs={"reasoning": {"threshold": 0.9, "min_steps": 5}})


class KilledDuringSave(BaseException):
    """A kill (SIGKILL, preemption) in the middle of a checkpoint save."""


def test_a_checkpoint_that_counts_as_complete_holds_the_reasoning_schedule(tiny_model_dir, rl_records, tmp_path,
                                                                           monkeypatch):
    """``trainer_state.json`` marks a checkpoint complete, so the schedule must be on disk before it: a save killed
    just before ``trainer_state.json`` (weights, optimizer, schedule written) does not count, and one killed just after
    it counts and holds the schedule. (The schedule used to be written after the Trainer's save: a kill in between
    left a complete checkpoint whose resume started the schedule over.)"""
    from transformers import TrainerState

    from emoreason.train.common import checkpoint_problem, last_complete_checkpoint

    records_file, _, data_root = rl_records
    trainer, _ = make_trainer(tiny_model_dir, records_file, data_root, tmp_path, **SCHEDULE_OPTIONS)
    folder = tmp_path / "grpo" / "checkpoint-1"
    before_state = {}
    write_state = TrainerState.save_to_json

    def save_then_die(state, json_path):
        # the moment before trainer_state.json: a kill here leaves this folder as it is now
        before_state.update(problem=checkpoint_problem(folder), last=last_complete_checkpoint(folder.parent),
                            weights=(folder / "model.safetensors").is_file(),
                            schedule=(folder / "reward_state.json").is_file())
        write_state(state, json_path)
        raise KilledDuringSave  # ... and a kill just after it: nothing the save does later reaches the disk

    monkeypatch.setattr(TrainerState, "save_to_json", save_then_die)
    with pytest.raises(KilledDuringSave):
        trainer.train()
    assert before_state["weights"] and "trainer_state.json" in before_state["problem"] and before_state["last"] is None
    assert before_state["schedule"], "the schedule must be written before trainer_state.json"
    assert checkpoint_problem(folder) is None and last_complete_checkpoint(folder.parent) == str(folder)
    assert json.loads((folder / "reward_state.json").read_text())["reasoning"]["schedule"]["steps"] == 1


@pytest.mark.parametrize("deepspeed", [False, True], ids=["plain", "deepspeed-branch"])
def test_reasoning_schedule_is_saved_with_checkpoints_and_restored_on_resume(deepspeed, tiny_model_dir, rl_records,
                                                                             tmp_path):
    """Resume restores the schedule, also on transformers' DeepSpeed branch of ``Trainer.train``, which never calls
    ``_load_from_checkpoint`` (the ZeRO engine loads the weights after ``prepare``). That branch is taken here by
    setting ``is_deepspeed_enabled`` for ``train``'s own checks and clearing it for the training loop (which would
    otherwise build a ZeRO engine): the spy proves ``_load_from_checkpoint`` was skipped."""
    records_file, _, data_root = rl_records
    trainer, _ = make_trainer(tiny_model_dir, records_file, data_root, tmp_path, **SCHEDULE_OPTIONS)
    trainer.train()
    schedule = trainer.reward_state()["reasoning"]["schedule"]
    assert schedule["steps"] == 1 and not schedule["active"]  # one batch of accuracy seen, not enough to switch on
    saved = tmp_path / "grpo" / "checkpoint-1" / "reward_state.json"
    assert saved.is_file()
    resumed, _ = make_trainer(tiny_model_dir, records_file, data_root, tmp_path, **dict(SCHEDULE_OPTIONS, max_steps=2))
    loaded = []
    load = resumed._load_from_checkpoint
    resumed._load_from_checkpoint = lambda *args, **kwargs: (loaded.append(args), load(*args, **kwargs))[1]
    if deepspeed:
        loop = resumed._inner_training_loop
        resumed.is_deepspeed_enabled = True

        def loop_without_an_engine(*args, **kwargs):
            resumed.is_deepspeed_enabled = False
            return loop(*args, **kwargs)

        resumed._inner_training_loop = loop_without_an_engine
    resumed.train(resume_from_checkpoint=str(tmp_path / "grpo" / "checkpoint-1"))
    assert bool(loaded) != deepspeed  # the branch taken: DeepSpeed's skips _load_from_checkpoint
    assert resumed.state.global_step == 2
    assert resumed.reward_state()["reasoning"]["schedule"]["steps"] == 2  # continued, not from scratch


def test_emoreason_train_grpo_runs_the_recipe_in_process(tiny_model_dir, rl_records, tmp_path):
    """`emoreason train grpo --config recipes/tiny-cpu/grpo.yaml [overrides]` (one process, no accelerate launch)."""
    from emoreason.train.cli import main

    records_file, _, data_root = rl_records
    out = tmp_path / "grpo-cli"
    assert main(["grpo", "--config", str(REPO / "recipes/tiny-cpu/grpo.yaml"), "--model_name_or_path",
                 str(tiny_model_dir), "--output_dir", str(out), "--train_records", str(records_file), "--data_root",
                 str(data_root), "--max_steps", "1", "--per_device_train_batch_size", "4", "--num_generations", "4",
                 "--max_completion_length", "8", "--save_strategy", "no", "--max_train_records", "4"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()


def test_a_checkpoint_from_before_the_generic_state_file_restores_the_schedule(tiny_model_dir, rl_records, tmp_path):
    """Checkpoints written before ``reward_state.json`` hold the reasoning schedule alone in ``reward_schedule.json``:
    resuming from one continues the schedule."""
    records_file, _, data_root = rl_records
    trainer, _ = make_trainer(tiny_model_dir, records_file, data_root, tmp_path, **SCHEDULE_OPTIONS)
    old = tmp_path / "old-checkpoint"
    old.mkdir()
    (old / "reward_schedule.json").write_text(json.dumps({"accuracy": 0.4, "steps": 7, "active": False}))
    assert trainer.load_reward_state(old)
    assert trainer.reward_state()["reasoning"]["schedule"] == {"accuracy": 0.4, "steps": 7, "active": False}
    assert not trainer.load_reward_state(tmp_path)  # nothing saved there: starts over, says so


def test_the_trainer_names_no_reward_group_rewards_bring_their_own_hook_and_state():
    """The GRPO trainer finds group rewards by their ``group_hook``; any reward object with one is called with the
    step's whole table (here a made-up reward that halves its own column) and its state is what checkpoints hold."""
    import inspect

    import torch

    from emoreason.train import grpo_trainer
    from emoreason.train.rewards import get_reward_funcs, group_rewards

    trainer = grpo_trainer.AudioGRPOTrainer
    for method in (trainer.__init__, trainer._calculate_rewards, trainer.reward_state, trainer._save_checkpoint):
        source = inspect.getsource(method)
        assert '"reasoning"' not in source and '"accuracy"' not in source, method.__name__
    funcs = get_reward_funcs(["accuracy", "reasoning", "format"])
    (reasoning,) = group_rewards(funcs)
    table = torch.tensor([[1.0, 0.9, 1.0], [0.0, 0.9, 1.0], [1.0, 0.2, 1.0], [0.0, 0.8, 1.0]])
    metrics = reasoning.group_hook(table, ["accuracy", "reasoning", "format"], 2, training=True)
    # group 1: the judge rates the wrong answer as high as the right one (gap 0): trust 1; group 2: it rates the wrong
    # one 0.6 higher: trust exp(-5 * 0.6)
    assert table[:, 1].tolist() == pytest.approx([0.9, 0.9, 0.2 * math.exp(-3.0), 0.8 * math.exp(-3.0)])
    assert table[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0] and metrics["reasoning/active"] == 1.0
    assert reasoning.state_dict()["schedule"]["steps"] == 1
    with pytest.raises(ValueError, match="needs 'accuracy'"):
        get_reward_funcs(["reasoning"])
