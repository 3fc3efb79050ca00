"""GRPO rollouts through vLLM's engine (colocate mode) with the audio, on the CPU engine.

One trainer, hence ONE engine, for the whole module (the engine's start is most of the cost). Its policy is a LoRA
model whose trainable projector holds fitted feature-normalisation statistics that the checkpoint on disk (what the
engine starts from) does not: only a sync that carries buffers as well as merged weights can make engine and policy
agree. The tests run in file order: step 0 (sync, greedy parity), the loss on the vLLM path, then training; last, the
learning test shuts that engine down and trains the tiny recipe of tests/test_grpo.py with an engine of its own.

Figures (2 loaded CPU cores, `-s` prints them): step 0, engine vs policy log-probs on a 29-token completion agree to
~5e-7 after a sync; greedy rollouts are token-identical to ``generate``; TRL's importance-sampling ratio is 1 to ~1e-6.
"""

from __future__ import annotations

import os
import shutil

import pytest

from conftest import REPO, free_port, needs_engine

pytestmark = [needs_engine, pytest.mark.slow, pytest.mark.timeout(1500)]

# Engine and policy run the same float32 arithmetic in different kernels (vLLM's CPU attention and fused
# projections vs torch's): their per-token log-probs differ by rounding only. The controls below differ by > 0.05.
LOGP_TOLERANCE = 2e-3
FIXED_COMPLETION = "<think>The pitch is high and the speaking rate is fast.</think>\n<answer>happy</answer>"
AUDIO_KEYS = ("input_features", "input_features_mask", "input_values", "input_values_mask")


def completion_length(completions, **kwargs):
    """A reward that tells random completions apart, so a tiny random policy gets non-zero advantages."""
    return [float(len(c[0]["content"]) if isinstance(c, list) else len(c)) for c in completions]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """Manifest of a small synthetic corpus (2 speakers x 3 sentences x 4 emotions); its folder is the data root."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (make system-deps)")
    from emoreason.testing.synth_corpus import synthesize

    return synthesize(tmp_path_factory.mktemp("grpo-vllm-corpus"), train_speakers=2, sentences_per_speaker=3,
                      workers=2)


@pytest.fixture(scope="module")
def rl_rows(small_corpus):
    from emoreason.train.grpo import load_examples

    return load_examples(str(small_corpus), str(small_corpus.parent), "train", max_records=8)


@pytest.fixture(scope="module")
def trainer(tiny_checkpoint, rl_rows, tmp_path_factory):
    import datasets
    import torch

    from emoreason.modeling import load_pretrained
    from emoreason.modeling.lora import apply_lora
    from emoreason.train.grpo import EmoReasonGRPOConfig
    from emoreason.train.grpo_trainer import AudioGRPOTrainer

    os.environ.setdefault("OMP_NUM_THREADS", "2")
    model, processor = load_pretrained(tiny_checkpoint)
    policy = apply_lora(model, r=4, alpha=8, dropout=0.0)
    projector = policy.get_base_model().model.audio_encoder.projector.modules_to_save["default"]
    g = torch.Generator().manual_seed(0)
    projector.set_feature_stats(torch.randn(projector.content_mean.shape, generator=g),
                                torch.rand(projector.content_std.shape, generator=g) + 0.5,
                                torch.randn(projector.paralinguistic_mean.shape, generator=g),
                                torch.rand(projector.paralinguistic_std.shape, generator=g) + 0.5, frames=99)
    args = EmoReasonGRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("grpo-vllm")), use_vllm=True, vllm_mode="colocate",
        vllm_max_model_length=1024, per_device_train_batch_size=4, num_generations=2, max_completion_length=8,
        max_steps=3, learning_rate=3e-2, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
        beta=0.0, seed=0, bf16=False)
    trainer = AudioGRPOTrainer(model=policy, reward_funcs=[completion_length], args=args,
                               train_dataset=datasets.Dataset.from_list(rl_rows), processing_class=processor)
    yield trainer
    # The engine ran in this process: shut it down and release vLLM's process-wide parallel state, so that later
    # tests (test_model.py builds the model in a one-process "cluster" of its own) can initialise theirs.
    trainer.vllm_generation.close()


def policy_logps(trainer, prompt, completion_ids):
    """The policy's per-token log-probs of ``completion_ids`` after ``prompt`` (with its clip), as GRPO's loss
    computes them; also returns the prompt's ids and clip as the trainer tokenised them."""
    import torch

    prompt_ids, _, _ = trainer._tokenize_prompts([prompt])
    clip = trainer._rollout_audio[0]
    ids = torch.tensor([prompt_ids[0] + completion_ids])
    was_training = trainer.model.training
    trainer.model.eval()
    try:
        with torch.no_grad():
            logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, torch.ones_like(ids),
                                                                     len(completion_ids))
    finally:
        trainer._audio_batch = None
        trainer.model.train(was_training)
    return logps[0], prompt_ids[0], clip


def engine_vs_policy(trainer, prompt) -> float:
    """Largest per-token |log-prob difference| between engine and policy on the fixed completion."""
    import torch

    completion = trainer.processing_class.tokenizer.encode(FIXED_COMPLETION, add_special_tokens=False)
    policy, prompt_ids, clip = policy_logps(trainer, prompt, completion)
    engine = trainer.vllm_generation.score([prompt_ids], [completion], [clip])[0]
    return float((torch.tensor(engine) - policy).abs().max())


def test_step0_the_synced_engine_scores_and_decodes_as_the_policy(trainer, rl_rows):
    import torch

    prompt = rl_rows[0]["prompt"]
    # The engine started from the checkpoint on disk and was loaded with the policy (fitted statistics included).
    at_start = engine_vs_policy(trainer, prompt)
    # Control: new statistics on the policy's projector (buffers only) reach the engine only through a sync.
    projector = trainer.model.get_base_model().model.audio_encoder.projector.modules_to_save["default"]
    with torch.no_grad():
        projector.content_std.mul_(2.0)
        projector.paralinguistic_mean.add_(0.5)
    stale = engine_vs_policy(trainer, prompt)
    trainer.vllm_generation.sync_weights()
    synced = engine_vs_policy(trainer, prompt)
    print(f"step 0: max |engine - policy| log-prob {at_start:.2e} at start, {stale:.4f} after new statistics, "
          f"{synced:.2e} after the sync")
    assert at_start < LOGP_TOLERANCE and stale > 0.05 and synced < LOGP_TOLERANCE

    # Greedy rollouts: vLLM with the clips in multi_modal_data vs the policy's own generate, row by row.
    prompts = [row["prompt"] for row in rl_rows[:3]]
    prompt_ids, _, fields = trainer._tokenize_prompts(prompts)
    clips, trainer._audio_batch = trainer._rollout_audio, None
    seen_ids, vllm_ids, vllm_logps = trainer.vllm_generation.generate_with_audio(prompt_ids, clips, temperature=0.0,
                                                                                 max_tokens=12, logprobs=0)
    assert seen_ids == prompt_ids  # vLLM found the placeholder run the processor expanded, at the same length
    model = trainer.model.eval()
    eos = trainer.processing_class.tokenizer.eos_token_id
    for row, ids in enumerate(prompt_ids):
        # One row, its clip cut to its own length: as vLLM encodes it (no batch padding).
        frames, samples = int(fields["input_features_mask"][row].sum()), int(fields["input_values_mask"][row].sum())
        inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                  "input_features": fields["input_features"][row:row + 1, :, :frames],
                  "input_features_mask": fields["input_features_mask"][row:row + 1, :frames],
                  "input_values": fields["input_values"][row:row + 1, :samples],
                  "input_values_mask": fields["input_values_mask"][row:row + 1, :samples]}
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=12)
        hf = out[0, len(ids):].tolist()
        hf = hf[: hf.index(eos) + 1] if eos in hf else hf
        assert vllm_ids[row] == hf, f"row {row}: vLLM {vllm_ids[row]} != generate {hf}"
        assert len(vllm_logps[row]) == len(vllm_ids[row])


def test_audio_reaches_the_loss_on_the_vllm_path(trainer, rl_rows):
    import torch

    calls = []
    generate = trainer.vllm_generation.generate_with_audio

    def spy(prompts, audio, **kwargs):
        calls.append(audio)
        return generate(prompts, audio, **kwargs)

    trainer.vllm_generation.generate_with_audio = spy
    trainer.model.train()
    try:
        batch = trainer._generate_and_score_completions([rl_rows[0], rl_rows[0], rl_rows[1], rl_rows[1]])
    finally:
        del trainer.vllm_generation.generate_with_audio
    assert len(calls) == 1 and len(calls[0]) == 4 and all(c is not None and len(c) > 1000 for c in calls[0])
    assert batch["input_features"].shape[0] == batch["completion_ids"].shape[0] == 4
    # TRL's importance-sampling ratio compares the engine's sampled log-probs with the policy's log-prob pass over
    # the same rows: 1 when both heard the same clip with the same weights (the engine was synced for this step).
    ratio = batch["importance_sampling_ratio"]
    print(f"vLLM-path importance-sampling ratio: max |ratio - 1| = {float((ratio - 1).abs().max()):.2e}")
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=10 * LOGP_TOLERANCE)

    trainer.current_gradient_accumulation_steps = 1
    batch["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5])
    with torch.no_grad():
        real = trainer._compute_loss(trainer.model, batch)
        zeroed = dict(batch, input_features=torch.zeros_like(batch["input_features"]),
                      input_values=torch.zeros_like(batch["input_values"]))
        silent = trainer._compute_loss(trainer.model, zeroed)
    print(f"vLLM-path GRPO loss: real audio {real.item():.6f}, zeroed audio {silent.item():.6f}")
    assert abs(real.item() - silent.item()) > 1e-6


def test_weights_follow_the_optimizer_steps(trainer, rl_rows):
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert all(float(p.abs().max()) == 0.0 for p in lora_b)  # LoRA starts at the base model
    trainer.train()
    assert trainer.state.global_step == 3
    assert any(float(p.abs().max()) > 0.0 for p in lora_b)  # the merge matters from here on
    prompt = rl_rows[1]["prompt"]
    # The engine was last synced before the final optimizer step (TRL syncs before each step's rollouts).
    stale = engine_vs_policy(trainer, prompt)
    trainer.vllm_generation.sync_weights()
    synced = engine_vs_policy(trainer, prompt)
    print(f"after 3 steps: max |engine - policy| log-prob {stale:.4f} one step stale, {synced:.2e} after the sync")
    assert stale > 0.05 and synced < LOGP_TOLERANCE


# -- learning: the reward rises on the vLLM path as with HF generate ------------------------------------------------
CURVE_WINDOW = 6  # steps averaged at each end of the 24-step training-reward curve


def make_learning_trainer(model_dir, records_file, data_root, out_dir, reward_funcs=("format", "accuracy"),
                          n_prompts=2, **config):
    """tests/test_grpo.py's ``make_trainer``: the full tiny model, the first ``n_prompts`` training records. Each
    trainer is kept in ``LEARNING_TRAINERS``, so that its engine is shut down whatever happens."""
    import datasets

    from emoreason.modeling import load_pretrained
    from emoreason.testing.grpo_recipe import grpo_options
    from emoreason.train.grpo import EmoReasonGRPOConfig, load_examples
    from emoreason.train.grpo_trainer import AudioGRPOTrainer
    from emoreason.train.rewards import get_reward_funcs

    model, processor = load_pretrained(model_dir)
    rows = load_examples(str(records_file), str(data_root), "train", max_records=max(n_prompts, 8))
    args = EmoReasonGRPOConfig(**grpo_options(out_dir, reward_funcs, **config))
    trainer = AudioGRPOTrainer(model=model, reward_funcs=get_reward_funcs(args.reward_funcs, args.reward_kwargs),
                               args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=processor)
    LEARNING_TRAINERS.append(trainer)
    return trainer, rows


LEARNING_TRAINERS: list = []


def test_the_reward_rises_on_the_vllm_path_as_with_hf_generate(trainer, tmp_path):
    """The learning recipe of tests/test_grpo.py (emoreason.testing.grpo_recipe: 60 SFT warm-start steps, then format
    + length rewards, 24 GRPO steps at 3e-3, 2 prompts x 4 generations a step), run twice from the same (seeded)
    warm start in this environment: rollouts (training and the before/after probe) from HF ``generate``, then from the
    colocated engine. Both must rise (the probe by > 0.2, the training reward of the last 6 steps over the first 6 by
    > 2 standard errors), and the vLLM path must start and end where the HF path does.

    Measured in .venv-vllm (2 shared CPU cores; 40 s for both runs at 1 thread, reruns give the same figures):

    ==================================  =======================  =======================
    figure                              HF generate              vLLM colocate
    ==================================  =======================  =======================
    probe reward, before -> after       -0.625 -> -0.109         -0.555 -> 0.000
    training reward, steps 1-6 / 19-24  -0.595 / -0.042          -0.684 / 0.000
    spread (std) of steps 1-6 / 19-24   0.455 (larger window)    0.149 (larger window)
    rise / its standard error           0.55 / 0.188 (2.9x)      0.68 / 0.061 (11.3x)
    the same at OMP_NUM_THREADS=2       -0.625 -> 0.000, 4.3x    -0.555 -> 0.000, 10.2x
    ==================================  =======================  =======================

    tests/test_grpo.py (training environment, transformers 5.23, 1 thread): -0.659 -> 0.000, rise 4.5x.

    What the tiny model learns on both paths is to stop early (probe completions ~25 -> 3-7 tokens): the length
    penalty goes (-1.2 -> 0) and the format reward with it (0.5-0.7 -> 0): a test that rollouts, rewards and
    updates make a learning loop on the vLLM path as on the HF one, not of answer quality."""
    from emoreason.data.schema import write_records
    from emoreason.testing.grpo_recipe import (
        MIN_RISE_STANDARD_ERRORS,
        describe,
        reasoning_records,
        rise,
        run_learning_recipe,
    )
    from emoreason.testing.synth_corpus import synthesize
    from emoreason.testing.tiny import build_tiny_model
    from emoreason.train.collators import SFTCollator

    # One engine per process at a time: the module's engine goes first (its fixture's own close is then a no-op).
    trainer.vllm_generation.close()
    # The same tiny model and corpus as tests/conftest.py's tiny_model_dir and synth_corpus.
    model_dir = build_tiny_model(tmp_path / "tiny-model")
    manifest = synthesize(tmp_path / "corpus")
    records, _ = reasoning_records(manifest)
    records_file = write_records(records, tmp_path / "records.jsonl")
    results = {}
    for path, options in (("HF generate", {}), ("vLLM colocate", dict(use_vllm=True, vllm_mode="colocate",
                                                                       vllm_max_model_length=1024))):
        try:
            results[path] = run_learning_recipe(make_learning_trainer, SFTCollator, model_dir, records_file, manifest.parent,
                                                tmp_path / path.split()[0], bf16=False, **options)
        finally:  # later tests (test_model.py) set up vLLM's parallel state of their own
            for learner in LEARNING_TRAINERS:
                if learner.use_vllm:
                    learner.vllm_generation.close()
        print(f"GRPO ({path}): {describe(results[path], CURVE_WINDOW)}")
    ends = {}
    for path, result in results.items():
        before, after = result["before"]["eval_reward"], result["after"]["eval_reward"]
        curve = rise(result["curve"], CURVE_WINDOW)
        # tests/test_grpo.py's criterion on the probe, and the training reward beyond its step-to-step noise.
        assert after > before + 0.2, path
        assert curve.last - curve.first > MIN_RISE_STANDARD_ERRORS * curve.noise, path
        ends[path] = before, after, curve.last
    # Roughly the same curve: the same start (the same warm start; the probe's sampling differs) and the same end.
    (hf_before, hf_after, hf_last), (vllm_before, vllm_after, vllm_last) = ends["HF generate"], ends["vLLM colocate"]
    assert abs(vllm_before - hf_before) < 0.2 and abs(vllm_after - hf_after) < 0.25 and abs(vllm_last - hf_last) < 0.15


# -- two ranks, one engine each (accelerate launch, gloo on CPU) ------------------------------------------------------
def test_two_ranks_each_sample_from_an_engine_synced_with_the_policy(tiny_checkpoint, small_corpus, tmp_path):
    """`accelerate launch --config_file accelerate_configs/cpu_2proc.yaml -m emoreason.train.grpo ... --use_vllm true
    --vllm_mode colocate`: two CPU processes (gloo), each with its own in-process engine (vLLM's external launcher)
    fed its own rows' clips. Every step, on both ranks, the engine's sampled log-probs must equal the policy's log-prob
    pass (TRL gathers the largest difference over the ranks), also after optimizer steps that moved the weights (an
    engine one step stale was off by 0.075-0.10 in test_weights_follow_the_optimizer_steps).

    Measured (OMP_NUM_THREADS=1, 2 shared cores; the learning recipe's warm start on the tiny checkpoint, format +
    length rewards at 3e-3, 2 prompts x 4 generations per rank, 4 steps; 36 s with both engines' starts): largest
    engine-vs-policy log-prob difference per step 2.1e-5, 7.6e-6, 4.5e-6, 1.4e-6 (importance-sampling ratio 1.000);
    grad norm 0.25, 2.46, 1.75, 0 (every completion then scores 0); reward -0.48, -0.82, -0.01, 0.00. At exit each
    rank prints vLLM's "ValueError: Invalid process group specified" (the engine's finalizer runs after the entry
    point destroyed the process group); the exit status stays 0."""
    import json
    import subprocess
    import sys

    import yaml

    from emoreason.data.schema import write_records
    from emoreason.testing.grpo_recipe import reasoning_records, warm_start
    from emoreason.train.collators import SFTCollator

    records, _ = reasoning_records(small_corpus)
    records_file = write_records(records, tmp_path / "records.jsonl")
    start = warm_start(SFTCollator, tiny_checkpoint, records_file, small_corpus.parent, tmp_path / "sft")
    recipe = yaml.safe_load((REPO / "recipes/tiny-cpu/grpo.yaml").read_text())
    recipe.update(reward_funcs=["format", "length"], reward_weights=[1.0, 1.0], learning_rate=3e-3,
                  reward_kwargs={"length": {"target_tokens": 12, "max_penalty": 3.0}})
    config = tmp_path / "grpo.yaml"
    config.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "accelerate_configs/cpu_2proc.yaml"), "--main_process_port", str(free_port()),
               "-m", "emoreason.train.grpo", "--config", str(config), "--model_name_or_path", str(start),
               "--output_dir", str(out), "--train_records", str(records_file), "--data_root", str(small_corpus.parent),
               "--max_steps", "4", "--per_device_train_batch_size", "8", "--num_generations", "4",
               "--max_completion_length", "32", "--max_train_records", "24", "--save_strategy", "no",
               "--use_vllm", "true", "--vllm_mode", "colocate", "--vllm_max_model_length", "1024"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               VLLM_TARGET_DEVICE="cpu")
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"{' '.join(command)}\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    history = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "reward" in h]
    print("two ranks: " + "; ".join(
        f"step {h['step']} logp diff {h['sampling/sampling_logp_difference/max']:.1e} grad {h['grad_norm']:.2f} "
        f"reward {h['reward']:.2f}" for h in history))
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert all(h["sampling/sampling_logp_difference/max"] < LOGP_TOLERANCE for h in history)
    assert any(h["grad_norm"] > 0 for h in history[:-1])  # the weights moved, so later steps test the sync
