"""What the first GPU run met on the 7B recipes' path (SFT from parts with LoRA and sdpa, then GRPO / DPO / export),
reproduced on a CPU with the recipes' architectures at tiny widths (emoreason.testing.recipe_parts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from emoreason.modeling import EmoReasonForConditionalGeneration, EmoReasonProcessor, build_from_components
from emoreason.modeling.loading import CheckpointError, attn_implementation_per_part, checkpoint_base
from emoreason.testing.recipe_parts import build_recipe_parts

REPO = Path(__file__).resolve().parents[1]
QWEN = "qwen2.5-7b-whisper-wavlm"
LLAMA = "llama3.1-8b-whisper-hubert"


@pytest.fixture(scope="module")
def qwen_parts(tmp_path_factory):
    return build_recipe_parts(QWEN, tmp_path_factory.mktemp("qwen-parts"))


@pytest.fixture(scope="module")
def llama_parts(tmp_path_factory):
    return build_recipe_parts(LLAMA, tmp_path_factory.mktemp("llama-parts"))


def _assemble(parts, **kwargs):
    return build_from_components(parts["content_encoder"], parts["paralinguistic_encoder"], parts["language_model"],
                                 **kwargs)


def _attn(model) -> dict[str, str]:
    inner = model.model.audio_encoder
    return {"content": inner.content_encoder.config._attn_implementation,
            "paralinguistic": inner.paralinguistic_encoder.config._attn_implementation,
            "lm": model.model.language_model.config._attn_implementation}


# -- defect 1: an SFT from parts with LoRA must write where its base is ----------------------------------------
def test_sft_from_parts_with_lora_writes_its_base_and_grpo_loads_it(qwen_parts, synth_corpus, tmp_path):
    from emoreason.train.common import EmoReasonModelArguments, get_model, get_processor
    from emoreason.train.sft import cli

    out = tmp_path / "sft"
    args = ["--config", str(REPO / "recipes" / QWEN / "sft.yaml"),
            *[x for key, path in qwen_parts.items() for x in (f"--{key}", str(path))],
            "--train_records", str(synth_corpus), "--eval_records", str(synth_corpus),
            "--data_root", str(synth_corpus.parent), "--output_dir", str(out), "--tasks", "emotion_label",
            "--max_steps", "1", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--dataloader_num_workers", "0",
            "--feature_norm_clips", "4", "--max_train_records", "8", "--disable_tqdm", "true",
            "--use_cpu", "true", "--bf16", "false", "--dtype", "float32"]
    assert cli(args) == 0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((out / "base").resolve())
    # what GRPO, DPO and export do with it: load the adapter onto that base, with the recipe's sdpa
    model_args = EmoReasonModelArguments(model_name_or_path=str(out), dtype="float32", attn_implementation="sdpa")
    model = get_model(model_args)
    assert type(model).__name__ == "PeftModelForCausalLM"
    assert isinstance(get_processor(model_args), EmoReasonProcessor)


# -- defect 2: the recipes' attn_implementation must load a saved model ----------------------------------------
def test_saved_model_loads_with_sdpa_each_part_getting_what_it_supports(qwen_parts, llama_parts, tmp_path):
    qwen, processor = _assemble(qwen_parts, attn_implementation="sdpa")
    assert _attn(qwen) == {"content": "sdpa", "paralinguistic": "eager", "lm": "sdpa"}  # WavLM has no SDPA
    qwen.save_pretrained(tmp_path / "qwen")
    loaded = EmoReasonForConditionalGeneration.from_pretrained(tmp_path / "qwen", attn_implementation="sdpa")
    assert _attn(loaded) == {"content": "sdpa", "paralinguistic": "eager", "lm": "sdpa"}
    eager = EmoReasonForConditionalGeneration.from_pretrained(tmp_path / "qwen", attn_implementation="eager")
    assert set(_attn(eager).values()) == {"eager"}
    # HuBERT has SDPA: it gets it, at assembly and at load
    llama, _ = _assemble(llama_parts, attn_implementation="sdpa")
    assert _attn(llama) == {"content": "sdpa", "paralinguistic": "sdpa", "lm": "sdpa"}
    # the same outputs whichever kernel each part runs
    clip = np.sin(np.linspace(0, 400, 16000)).astype(np.float32)
    batch = processor(text="<audio> hello", audio=clip)
    with torch.no_grad():
        a = loaded.eval()(**batch).logits
        b = eager.eval()(**batch).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_attention_per_part_rules():
    from transformers import HubertConfig, LlamaConfig, WavLMConfig, WhisperConfig

    parts = {"content_config": WhisperConfig(), "paralinguistic_config": WavLMConfig(), "text_config": LlamaConfig()}
    assert attn_implementation_per_part(parts, "sdpa") == {
        "": "sdpa", "content_config": "sdpa", "paralinguistic_config": "eager", "text_config": "sdpa"}
    assert attn_implementation_per_part(parts, "flash_attention_2")["paralinguistic_config"] == "eager"
    assert attn_implementation_per_part({"p": HubertConfig()}, "flash_attention_2")["p"] == "flash_attention_2"
    assert attn_implementation_per_part(parts, None) is None
    explicit = {"": "sdpa", "paralinguistic_config": "eager"}
    assert attn_implementation_per_part(parts, explicit) is explicit


# -- the HuBERT recipe: its encoder's API differs from WavLM's ---------------------------------------------------
def test_hubert_large_layout_encodes_a_batch_of_unequal_clips(llama_parts):
    model, processor = _assemble(llama_parts)
    clips = [np.random.default_rng(i).standard_normal(n).astype(np.float32) * 0.1 for i, n in enumerate((16000, 9000))]
    batch = processor(text=["<audio> a", "<audio> b"], audio=clips)
    with torch.no_grad():
        out = model.eval()(**batch)
        alone = model(**processor(text="<audio> b", audio=clips[1]))
    assert torch.isfinite(out.logits).all()
    # a clip's result does not depend on its batch-mate (padding masked in the HuBERT tower too)
    real = batch["attention_mask"][1].bool()
    assert int(real.sum()) == alone.logits.shape[1]
    torch.testing.assert_close(out.logits[1][real], alone.logits[0], rtol=1e-3, atol=1e-3)


# -- defect 5: Llama 3.x tokenizers add BOS and their template writes one too ------------------------------------
def test_llama_prompts_carry_one_bos_in_processor_and_collator_alike(llama_parts, synth_corpus):
    from emoreason.train.collators import IGNORE_INDEX, SFTCollator
    processor = EmoReasonProcessor.from_components(*llama_parts.values())
    tokenizer = processor.tokenizer
    bos = tokenizer.bos_token_id
    assert tokenizer("x").input_ids[0] == bos  # the stand-in adds BOS itself, as Llama-3.1's tokenizer does
    rows = [json.loads(line) for line in synth_corpus.read_text().splitlines() if line.strip()]
    record = next(r for r in rows if r.get("split") == "train")
    example = {**record, "task": "emotion_label", "instruction": "What emotion is expressed?",
               "response": "<answer>angry</answer>"}
    collator = SFTCollator(processor, synth_corpus.parent)
    prompt, _ = collator.render(example)
    assert prompt.startswith(tokenizer.bos_token)
    batch = collator([example])
    prompt_ids = batch["input_ids"][0][batch["labels"][0] == IGNORE_INDEX].tolist()
    served = processor(text=prompt, audio=str(synth_corpus.parent / record["audio"]))["input_ids"][0].tolist()
    assert served.count(bos) == 1 and prompt_ids.count(bos) == 1
    assert served == prompt_ids
    # a row without the template's BOS still gets the tokenizer's one; mixed rows line up
    mixed = processor(text=[prompt, prompt[len(tokenizer.bos_token):]], audio=[str(synth_corpus.parent / record["audio"])] * 2)
    rows = [[t for t, m in zip(ids, mask) if m] for ids, mask in zip(mixed["input_ids"].tolist(),
                                                                     mixed["attention_mask"].tolist())]
    assert rows[0] == rows[1] and rows[0].count(bos) == 1


# -- bad input: a base that cannot be found is one clear error, before any weights load -----------------------------
def test_unloadable_model_paths_are_clear_errors_before_any_weight_loads(tmp_path, monkeypatch):
    from emoreason.train.common import EmoReasonModelArguments, get_model

    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the path was checked")

    monkeypatch.setattr(EmoReasonForConditionalGeneration, "from_pretrained", no_load)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": None}))
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: base_model_name_or_path is empty"):
        get_model(EmoReasonModelArguments(model_name_or_path=str(adapter)))
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: base_model_name_or_path .*gone.* not a folder"):
        get_model(EmoReasonModelArguments(model_name_or_path=str(adapter)))
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint_base(adapter)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="neither a model .* nor an adapter"):
        get_model(EmoReasonModelArguments(model_name_or_path=str(empty)))
    with pytest.raises(CheckpointError, match="not a folder on this machine"):
        get_model(EmoReasonModelArguments(model_name_or_path=str(tmp_path / "missing" / "sft")))
    # an SFT output written before the fix (base empty) still loads from the base it saved beside the adapter
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": None}))
    (adapter / "base").mkdir()
    (adapter / "base" / "config.json").write_text("{}")
    assert checkpoint_base(adapter) == str((adapter / "base").resolve())
    # a Hub id is left to from_pretrained
    assert checkpoint_base("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
