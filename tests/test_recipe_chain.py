"""Every GPU recipe folder, run as written at tiny widths on a CPU: SFT from parts -> GRPO -> DPO -> export --merge ->
serve -> eval (emoreason.testing.recipe_chain lists the only settings it overrides: paths, device, dtype, steps and
sizes, the judge's address).

The parts are the recipes' architectures built from configs (Whisper with 128 mel bins, WavLM-large / HuBERT-large's
pre-norm layout, Qwen2 / Llama with grouped-query attention; for the Llama recipe a tokenizer that adds its own BOS, as
Llama-3.1's does), so a recipe key that no longer parses, a setting that breaks loading (``attn_implementation: sdpa``
on WavLM), an adapter that forgets its base, or an encoder family whose API differs fails here before a GPU user
meets it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from emoreason.testing.recipe_chain import (
    ALLOWED_OVERRIDES,
    CPU_SIZES,
    Chain,
    format_table,
    head_records,
    judge_kwargs_at,
    load_recipe,
    override_args,
)
from emoreason.testing.recipe_parts import RECIPE_PARTS, build_recipe_parts

REPO = Path(__file__).resolve().parents[1]
GPU_RECIPES = sorted(p for p in (REPO / "recipes").iterdir() if p.is_dir() and p.name != "tiny-cpu")
JUDGE_KEY = "chain-judge-key"


def test_every_gpu_recipe_has_stand_in_parts():
    assert {p.name for p in GPU_RECIPES} == set(RECIPE_PARTS)
    for recipe in GPU_RECIPES:
        assert {f"{m}.yaml" for m in ("sft", "grpo", "dpo")} <= {p.name for p in recipe.iterdir()}


def test_chain_overrides_only_paths_device_and_sizes():
    with pytest.raises(ValueError, match="run them as written"):
        override_args({"max_steps": 1, "lora_r": 8})
    with pytest.raises(ValueError, match="run them as written"):
        override_args({"attn_implementation": "eager"})
    assert not {"attn_implementation", "use_peft", "lora_r", "lora_target_modules", "beta", "reward_funcs",
                "reward_weights", "tasks", "activation_checkpointing", "learning_rate"} & ALLOWED_OVERRIDES
    recipe = load_recipe(REPO / "recipes/qwen2.5-7b-whisper-wavlm/grpo.yaml")
    moved = judge_kwargs_at(recipe, "http://127.0.0.1:9/v1")
    assert moved["reasoning"]["judge_options"]["base_url"] == "http://127.0.0.1:9/v1"
    # everything else in the reward settings stays as written
    original = recipe["reward_kwargs"]
    assert {k: v for k, v in moved["reasoning"].items() if k != "judge_options"} == {
        k: v for k, v in original["reasoning"].items() if k != "judge_options"}
    assert moved["reasoning"]["judge_options"]["api_key_env"] == original["reasoning"]["judge_options"]["api_key_env"]
    assert {k: v for k, v in moved.items() if k != "reasoning"} == {
        k: v for k, v in original.items() if k != "reasoning"}


@pytest.fixture(scope="module")
def chain_data(synth_corpus, tmp_path_factory) -> dict[str, Path]:
    """Records with template-teacher rationales and DPO pairs, as `emoreason datagen` writes them."""
    out = tmp_path_factory.mktemp("chain-datagen")
    subprocess.run([sys.executable, "-m", "emoreason.cli", "datagen", "--config", "data_gen/configs/synthetic.yaml",
                    "--manifest", str(synth_corpus), "--out", str(out), "--teacher", "template", "--no-progress"],
                   cwd=REPO, check=True, capture_output=True, timeout=600)
    return {"records": out / "records.jsonl", "pairs": out / "pairs.jsonl", "data_root": synth_corpus.parent,
            "eval_records": head_records(out / "records.jsonl", out / "eval.jsonl", 4), "test_records": synth_corpus}


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("recipe_dir", GPU_RECIPES, ids=lambda p: p.name)
def test_gpu_recipe_chain_runs_as_written(recipe_dir, chain_data, tmp_path):
    parts = build_recipe_parts(recipe_dir.name, tmp_path / "parts", scale="tiny")
    chain = Chain(recipe_dir, tmp_path / "chain", chain_data, device="cpu", sizes=CPU_SIZES, repo=REPO,
                  env={"JUDGE_API_KEY": JUDGE_KEY})

    chain.sft(parts)
    sft = chain.out("sft")
    adapter = json.loads((sft / "adapter_config.json").read_text())
    # the adapter names the base that SFT assembled and saved, so every later stage can load it
    assert Path(adapter["base_model_name_or_path"]) == (sft / "base").resolve()
    assert (sft / "base" / "config.json").is_file()
    base_config = json.loads((sft / "base" / "config.json").read_text())
    assert base_config["paralinguistic_config"]["model_type"] == RECIPE_PARTS[recipe_dir.name].paralinguistic

    # GRPO's reasoning reward asks the recipe's judge (an OpenAI endpoint): the built-in server on loopback, behind
    # the API key the recipe names (api_key_env), serving the SFT base
    with chain.server(sft / "base", "judge", api_key=JUDGE_KEY) as judge_url:
        chain.grpo(judge_url)
    # the judge was asked (at least its start-up probe) and answered behind the recipe's key
    assert '"POST /v1/chat/completions HTTP/1.1" 200' in (chain.work / "logs" / "serve-judge.log").read_text()
    chain.dpo()
    chain.export()
    exported = chain.out("export")
    assert not (exported / "adapter_config.json").exists() and (exported / "model.safetensors").is_file()

    with chain.server(exported, "chain") as url:
        chain.evaluate(REPO / "eval/suites/synthetic.yaml", url, "chain", limit=3, max_tokens=16,
                       strategies=["direct", "cot_greedy"])
    report = json.loads((chain.out("eval") / "report.json").read_text())
    assert report, "the evaluation wrote an empty report"
    print(f"\n{recipe_dir.name}\n{format_table(chain.results)}")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_gpu_smoke_script_small_runs_on_cpu_and_prints_its_table(chain_data, tmp_path):
    """`scripts/gpu_smoke.py --small`: the GPU smoke run's CPU dry run (tiny widths), as CI runs it."""
    proc = subprocess.run([sys.executable, "scripts/gpu_smoke.py", "--small", "--work", str(tmp_path / "smoke"),
                           "--data", str(chain_data["records"].parent), "--data-root", str(chain_data["data_root"])],
                          cwd=REPO, capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| stage | seconds | steps/s | tokens/s | peak GPU memory (GB) | MFU |" in proc.stdout
    rows = json.loads((tmp_path / "smoke" / "smoke.json").read_text())
    assert [r["stage"] for r in rows] == ["build parts (tiny)", "sft", "grpo", "dpo", "export"]
    sft = rows[1]
    assert sft["steps_per_second"] > 0 and sft["tokens_per_second"] > 0
    assert sft["peak_memory_gb"] is None and sft["mfu"] is None  # no GPU: nothing to measure them on
