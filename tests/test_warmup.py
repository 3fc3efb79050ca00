"""The text warm-up (`emoreason train warmup`): chats in, a whole EmoReason checkpoint out, the LLM alone changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from emoreason.train.common import TRAINING_INFO_FILE
from emoreason.train.warmup import EmoReasonWarmupConfig, load_chats, make_parser
from emoreason.train.warmup import main as warmup_main

ANSWER = "<think>\nThe pitch is high and the pace is fast.\n</think>\n<answer>happy</answer>"


def _chat(i: int, split: str, answer: str = ANSWER) -> dict:
    return {"id": f"c{i}", "split": split, "messages": [
        {"role": "user", "content": f"Clip {i}: the pitch is high. What emotion?"},
        {"role": "assistant", "content": answer}]}


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_chats_of_held_out_splits_never_train(tmp_path):
    path = _write(tmp_path / "chats.jsonl", [_chat(0, "train"), _chat(1, "test"), _chat(2, "validation"), ""])
    rows = load_chats(path, "train")
    assert len(rows) == 1 and rows[0]["prompt"][0]["role"] == "user" and rows[0]["completion"][0]["content"] == ANSWER
    assert len(load_chats(path, "all")) == 2  # every split but test
    with pytest.raises(ValueError, match="no chats of split 'train'"):
        load_chats(_write(tmp_path / "only-test.jsonl", [_chat(0, "test")]), "train")
    with pytest.raises(ValueError, match="held out"):
        EmoReasonWarmupConfig(output_dir=str(tmp_path / "x"), train_split="test", use_cpu=True)


@pytest.mark.parametrize("line, why", [
    ("{not json", "not a chat line"),
    (json.dumps({"id": "a", "split": "train"}), "not a chat line"),
    (json.dumps({"id": "a", "split": "train", "messages": [{"role": "user", "content": "q"}]}), "assistant turn"),
    (json.dumps({"id": "a", "split": "train", "messages": [{"role": "assistant", "content": 3}]}), "string"),
])
def test_a_malformed_chat_line_names_the_file_and_line(tmp_path, line, why):
    path = _write(tmp_path / "chats.jsonl", [_chat(0, "train"), line])
    with pytest.raises(ValueError, match=rf"chats.jsonl:2: .*{why}"):
        load_chats(path)
    with pytest.raises(FileNotFoundError, match="teacher_chats.jsonl"):
        load_chats(tmp_path / "missing.jsonl")


def _greedy(model_dir: Path, prompt: str) -> str:
    from emoreason.datagen.teachers import load_language_model

    lm, tokenizer = load_language_model(str(model_dir), device="cpu")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = lm.generate(**enc, do_sample=False, max_new_tokens=40, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_warmup_teaches_the_llm_the_answers_and_leaves_towers_and_projector_alone(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from emoreason.modeling import load_pretrained

    chats = _write(tmp_path / "chats.jsonl", [_chat(i, "train") for i in range(4)]
                   + [_chat(9, "test", "<think>\nleaked\n</think>\n<answer>sad</answer>")])
    out = tmp_path / "warm"
    args = make_parser().parse_args_and_config(args=[
        "--config", "recipes/tiny-cpu/warmup.yaml", "--model_name_or_path", str(tiny_model_dir),
        "--train_records", str(chats), "--output_dir", str(out), "--max_steps", "60", "--learning_rate", "3e-3",
        "--per_device_train_batch_size", "4", "--warmup_steps", "0", "--logging_steps", "5",
        "--disable_tqdm", "true"])
    assert _greedy(tiny_model_dir, "Clip 7: the pitch is high. What emotion?") != ANSWER
    metrics = warmup_main(*args)
    assert metrics["train_examples"] == 4  # the test-split chat never trained

    # a whole EmoReason checkpoint: loads like any other, and the LLM now writes the warm-up's answer
    model, processor = load_pretrained(out)
    assert model.config.model_type == "emoreason" and processor.tokenizer.chat_template
    assert _greedy(out, "Clip 7: the pitch is high. What emotion?").strip() == ANSWER
    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert losses[-1] < 0.2 * losses[0]

    # only the LLM (and its head) changed
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("model.language_model.", "lm_head.")) for k in changed), sorted(changed)[:5]
    assert any(k.startswith("model.language_model.") for k in changed)
    assert json.loads((out / TRAINING_INFO_FILE).read_text())["method"] == "warmup"
