#!/usr/bin/env python3
"""First run on a GPU machine, without downloading anything: a recipe's real shapes end to end, a few steps a stage.

    python scripts/gpu_smoke.py                                   # recipes/qwen2.5-7b-whisper-wavlm on the GPU
    python scripts/gpu_smoke.py --recipe recipes/llama3.1-8b-whisper-hubert
    python scripts/gpu_smoke.py --small                           # tiny widths on a CPU (what CI runs)

It builds random-weight parts in the recipe's published shapes directly on the GPU in bf16
(emoreason.testing.recipe_parts: Whisper-large-v3's encoder, WavLM-/HuBERT-large, a Qwen2.5-7B / Llama-3.1-8B body),
then launches the recipe's own stages as a user does (``accelerate launch -m emoreason.train.<method> --config
<recipe>``), overriding only paths, device, step counts and sizes (emoreason.testing.recipe_chain.ALLOWED_OVERRIDES):

    SFT from the parts (LoRA, sdpa, activation checkpointing as written) -> GRPO with HF generate rollouts
    (-> GRPO with colocated vLLM rollouts, where vLLM is installed) -> DPO -> export --merge

GRPO's reasoning judge is the heuristic one here (the recipe's OpenAI judge needs a served judge model). It prints one
table: stage, seconds, steps/s, tokens/s, peak GPU memory (torch.cuda.max_memory_allocated, from each trainer) and
model FLOP utilisation (6 x LM parameters x tokens / time / the GPU's dense bf16 peak). Logs of every stage stay in
--work. Data: ``--data DIR`` with records.jsonl / pairs.jsonl from `emoreason datagen` and ``--data-root`` with the
clips; without them a small espeak-ng corpus is synthesised and described by the template teacher (needs espeak-ng).
Exit status 0 when every stage ran.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

# dense bf16 peak of common training GPUs, TFLOP/s (vendor data sheets; SXM parts)
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "B200": 2250.0}

GPU_SIZES = {  # a few steps per stage; batch sizes stay the recipe's
    "sft": {"max_steps": 6, "logging_steps": 1},
    "grpo": {"max_steps": 2, "max_completion_length": 128, "gradient_accumulation_steps": 1, "logging_steps": 1},
    "dpo": {"max_steps": 3, "logging_steps": 1},
}


def peak_tflops(explicit: float | None) -> float | None:
    import torch

    if explicit:
        return explicit
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def lm_parameters(lm_dir: Path) -> int:
    """Parameters of the language model (embeddings and head included), counted on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(lm_dir))
    return sum(p.numel() for p in model.parameters())


def make_data(work: Path) -> dict[str, Path]:
    from emoreason.testing.recipe_chain import head_records
    from emoreason.testing.synth_corpus import synthesize

    manifest = synthesize(work / "corpus")
    out = work / "datagen"
    subprocess.run([sys.executable, "-m", "emoreason.cli", "datagen", "--config", "data_gen/configs/synthetic.yaml",
                    "--manifest", str(manifest), "--out", str(out), "--teacher", "template", "--no-progress"],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return {"records": out / "records.jsonl", "pairs": out / "pairs.jsonl", "data_root": manifest.parent,
            "eval_records": head_records(out / "records.jsonl", out / "eval.jsonl", 16)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/qwen2.5-7b-whisper-wavlm", help="recipe folder")
    parser.add_argument("--work", default="runs/gpu-smoke", help="parts, outputs and logs")
    parser.add_argument("--small", action="store_true", help="tiny widths on the CPU (a dry run; what CI runs)")
    parser.add_argument("--data", help="folder with records.jsonl and pairs.jsonl (emoreason datagen output)")
    parser.add_argument("--data-root", help="folder the records' audio paths are relative to")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from its name)")
    parser.add_argument("--stage-timeout", type=float, default=900, help="seconds per stage before it is stopped")
    parser.add_argument("--no-vllm", action="store_true", help="skip the colocated-vLLM GRPO stage")
    args = parser.parse_args(argv)

    import torch

    from emoreason.testing.recipe_chain import (
        CPU_SIZES,
        Chain,
        StageFailed,
        StageResult,
        format_table,
        head_records,
    )
    from emoreason.testing.recipe_parts import build_recipe_parts

    recipe = (REPO / args.recipe).resolve() if not Path(args.recipe).is_absolute() else Path(args.recipe)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    on_gpu = torch.cuda.is_available() and not args.small
    if not on_gpu and not args.small:
        parser.error("no CUDA device here: run with --small for the CPU dry run")
    if args.data:
        data = {"records": Path(args.data) / "records.jsonl", "pairs": Path(args.data) / "pairs.jsonl",
                "data_root": Path(args.data_root or args.data)}
        missing = [str(p) for p in data.values() if not p.exists()]
        if missing:
            parser.error(f"--data: not found: {missing}")
        data["eval_records"] = head_records(data["records"], work / "eval.jsonl", 16)
    else:
        data = make_data(work)

    rows: list[StageResult] = []
    start = time.perf_counter()
    scale = "real" if on_gpu else "tiny"
    parts = build_recipe_parts(recipe.name, work / "parts", scale=scale, device="cuda" if on_gpu else "cpu",
                               dtype=torch.bfloat16 if on_gpu else torch.float32)
    rows.append(StageResult(f"build parts ({scale})", time.perf_counter() - start))
    n_params = lm_parameters(parts["language_model"])
    chain = Chain(recipe, work / "chain", data, device="cuda" if on_gpu else "cpu",
                  sizes=GPU_SIZES if on_gpu else CPU_SIZES, repo=REPO, peak_tflops=peak_tflops(args.peak_tflops),
                  stage_timeout=args.stage_timeout)
    failed = None
    try:
        chain.sft(parts, n_params=n_params)
        chain.grpo(None, n_params=n_params)
        if not args.no_vllm and on_gpu and _has_vllm():
            chain.grpo(None, n_params=n_params, name="grpo-vllm", extra={"use_vllm": True, "vllm_mode": "colocate"})
        chain.dpo(n_params=n_params)
        chain.export()
    except StageFailed as err:
        failed = err
    rows += chain.results
    device = torch.cuda.get_device_name(0) if on_gpu else "CPU (--small)"
    print(f"\n{recipe.name} on {device}; LM {n_params / 1e6:,.1f} M parameters; logs in {work / 'chain' / 'logs'}")
    print(format_table(rows))
    (work / "smoke.json").write_text(json.dumps(
        [{"stage": r.stage, "seconds": r.seconds, "steps_per_second": r.steps_per_second,
          "tokens_per_second": r.tokens_per_second, "peak_memory_gb": r.peak_memory_gb, "mfu": r.mfu}
         for r in rows], indent=2))
    if failed is not None:
        print(f"\nFAILED: {failed}", file=sys.stderr)
        return 1
    return 0


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


if __name__ == "__main__":
    sys.exit(main())
