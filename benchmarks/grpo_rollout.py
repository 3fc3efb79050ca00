"""GRPO step and rollout time: HF ``generate`` vs colocated vLLM rollouts (with the audio), in one run.

    .venv-vllm/bin/python benchmarks/grpo_rollout.py [--size tiny|large] [--model DIR] [--steps 3]

Runs in the colocate environment (`make vllm-colocate`: vLLM + TRL in one environment, docs/rl.md). The same GRPO
configuration trains the same policy twice on the same prompts, once with rollouts from the policy's ``generate`` and
once from vLLM's engine in the same process (clips in ``multi_modal_data``, weights synced after each step), and the
script prints seconds per optimizer step and per rollout batch for both, and their ratio. The first step of each run
is a warm-up and is not counted; the runs alternate (``--repeats``) and medians are printed, since a shared machine's
load changes between runs; the engine's start-up and each weight sync are reported on their own lines.

``tiny`` (default): the test model (LM width 64), CPU-sized generation. ``large``: the LM 16x wider (1024) and the 7B
recipe's generation settings (8 generations, 256 tokens), for a GPU. ``--model DIR`` benchmarks a real checkpoint.
Clips come from the synthetic corpus (espeak-ng).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

SIZES = {
    "tiny": dict(hidden=64, prompts=2, num_generations=4, max_completion_length=32),
    "large": dict(hidden=1024, prompts=4, num_generations=8, max_completion_length=256),
}


class Clock:
    """Wall time of each call of ``owner.name`` (replaced on the instance)."""

    def __init__(self, owner, name: str):
        self.times: list[float] = []
        self.results: list = []
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = original(*args, **kwargs)
            self.times.append(time.perf_counter() - start)
            self.results.append(result)
            return result

        setattr(owner, name, timed)


def run(model_dir: Path, rows: list[dict], use_vllm: bool, steps: int, size: dict, out: Path, device_is_cpu: bool):
    import datasets
    from transformers import TrainerCallback

    from emoreason.modeling import load_pretrained
    from emoreason.modeling.lora import apply_lora
    from emoreason.train.grpo import EmoReasonGRPOConfig
    from emoreason.train.grpo_trainer import AudioGRPOTrainer

    model, processor = load_pretrained(model_dir)
    policy = apply_lora(model, r=8, alpha=16, dropout=0.0)
    batch = size["prompts"] * size["num_generations"]
    args = EmoReasonGRPOConfig(
        output_dir=str(out), use_vllm=use_vllm, vllm_mode="colocate", vllm_max_model_length=2048,
        vllm_gpu_memory_utilization=0.3, per_device_train_batch_size=batch, num_generations=size["num_generations"],
        max_completion_length=size["max_completion_length"], max_steps=steps + 1, learning_rate=1e-4,
        report_to="none", use_cpu=device_is_cpu, save_strategy="no", logging_steps=10**6, disable_tqdm=True, beta=0.0,
        seed=0, bf16=not device_is_cpu, reward_funcs=["format", "length"])

    from emoreason.train.rewards import get_reward_funcs

    step_times: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.start)

    start = time.perf_counter()
    trainer = AudioGRPOTrainer(model=policy, reward_funcs=get_reward_funcs(args.reward_funcs, args.reward_kwargs),
                               args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=processor,
                               callbacks=[StepClock()])
    built = time.perf_counter() - start
    rollouts = Clock(trainer, "_generate_single_turn")
    syncs = Clock(trainer.vllm_generation, "sync_weights") if use_vllm else None
    trainer.train()
    completions = [ids for completion_ids, _ in rollouts.results[1:] for ids in completion_ids]
    tokens = statistics.mean(len(ids) for ids in completions)
    result = {"step": statistics.mean(step_times[1:]), "rollout": statistics.mean(rollouts.times[1:]),
              "build": built, "sync": statistics.mean(syncs.times[1:]) if syncs and len(syncs.times) > 1 else None,
              "tokens": tokens}
    if use_vllm:
        trainer.vllm_generation.close()  # the next run starts its own engine in this process
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--model", help="a saved EmoReason checkpoint (default: build one of --size from configs)")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run (after one warm-up)")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="alternating HF/vLLM runs; medians are printed")
    args = parser.parse_args(argv)

    import torch

    from emoreason.testing.synth_corpus import synthesize
    from emoreason.testing.tiny import build_tiny_model
    from emoreason.train.grpo import load_examples

    size = SIZES[args.size]
    device_is_cpu = not torch.cuda.is_available()
    if device_is_cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = Path(args.model) if args.model else build_tiny_model(tmp / "model", hidden=size["hidden"],
                                                                         random_feature_stats=True)
        manifest = synthesize(tmp / "corpus", train_speakers=2, sentences_per_speaker=max(2, args.clips // 2))
        rows = load_examples(str(manifest), str(manifest.parent), "train", max_records=args.clips)
        # Alternating runs, medians: on a shared machine the load changes between runs.
        runs = {False: [], True: []}
        for repeat in range(args.repeats):
            for use_vllm in (False, True):
                runs[use_vllm].append(run(model_dir, rows, use_vllm, args.steps, size, tmp / f"{use_vllm}{repeat}",
                                          device_is_cpu))
        hf, vllm = ({key: statistics.median(r[key] for r in runs[v]) if runs[v][0][key] is not None else None
                     for key in runs[v][0]} for v in (False, True))

    where = "CPU" if device_is_cpu else torch.cuda.get_device_name()
    print(f"GRPO, {args.model or args.size} model on {where}: {size['prompts']} prompts x {size['num_generations']} "
          f"generations, up to {size['max_completion_length']} tokens, mean of {args.steps} steps after a warm-up, "
          f"median of {args.repeats} alternating runs")
    print(f"{'rollouts':<22}{'s/step':>10}{'s/rollout':>12}{'tokens':>9}")
    for name, r in (("HF generate", hf), ("vLLM colocate", vllm)):
        print(f"{name:<22}{r['step']:>10.2f}{r['rollout']:>12.2f}{r['tokens']:>9.1f}")
    print(f"vLLM engine start {vllm['build'] - hf['build']:.1f} s (once); weight sync {vllm['sync'] or 0:.3f} s/step "
          f"(inside s/rollout)")
    print(f"speed-up with vLLM rollouts: {hf['step'] / vllm['step']:.2f}x per step, "
          f"{hf['rollout'] / vllm['rollout']:.2f}x per rollout")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
