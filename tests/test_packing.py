"""Padding-free packing: a batch's examples in one row with restarting position ids give the padded batch's loss."""

from __future__ import annotations

import pytest
import torch

from emoreason.train.collators import IGNORE_INDEX, SFTCollator
from emoreason.data.schema import read_records
from emoreason.train.tasks import build_task_examples, parse_task_specs


@pytest.fixture(scope="module")
def rows(synth_corpus):
    records = read_records(synth_corpus)[:4]
    return build_task_examples(parse_task_specs("emotion_label,transcription,captioning"), records, split=None)[:4]


def test_packed_row_layout(tiny, synth_corpus, rows):
    _, processor = tiny
    padded = SFTCollator(processor, synth_corpus.parent)(rows)
    packed = SFTCollator(processor, synth_corpus.parent, packing=True)(rows)
    lengths = padded["attention_mask"].sum(-1).tolist()
    assert len(set(lengths)) > 1  # the padded batch does pad
    assert "attention_mask" not in packed and packed["input_ids"].shape == (1, sum(lengths))
    expected = [t for i, n in enumerate(lengths) for t in padded["input_ids"][i, :n].tolist()]
    assert packed["input_ids"][0].tolist() == expected
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    assert (packed["position_ids"][0] == 0).nonzero().flatten().tolist() == starts
    assert packed["cu_seq_lens_q"].tolist() == starts + [sum(lengths)] and packed["max_length_q"] == max(lengths)
    # the same label tokens (every example's first token is a prompt token, ignored in both)
    assert (packed["labels"] != IGNORE_INDEX).sum() == (padded["labels"] != IGNORE_INDEX).sum()
    for key in ("input_features", "input_features_mask", "input_values", "input_values_mask"):
        assert torch.equal(packed[key], padded[key]), key  # each clip stays its own audio row


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(tiny, synth_corpus, rows, mode):
    """fp32, to 1e-5. In train mode the LM's config asks for a cache (use_cache) and no one says otherwise: a packed
    row must still never build one, since transformers then ignores the example boundaries."""
    model, processor = tiny
    padded = SFTCollator(processor, synth_corpus.parent)(rows)
    packed = SFTCollator(processor, synth_corpus.parent, packing=True)(rows)
    model.train(mode == "train")
    model.config.text_config.use_cache = True
    model.model.language_model.config.use_cache = True
    losses, grads = [], []
    try:
        for batch in (padded, packed):
            model.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            losses.append(loss.detach())
            grads.append(model.model.audio_encoder.projector.linear_2.weight.grad.clone())
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    assert torch.allclose(losses[0], losses[1], atol=1e-5, rtol=0), (losses[0].item(), losses[1].item())
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    # and the boundaries matter: one causal row over all examples (a plain attention mask) scores differently
    with torch.no_grad():
        joined = model(**packed, attention_mask=torch.ones_like(packed["input_ids"])).loss
    assert abs(joined.item() - losses[0].item()) > 1e-3


def test_sft_with_pack_batches_trains_the_same_steps(tiny_model_dir, synth_corpus, tmp_path):
    """The SFT entry point with ``pack_batches``: TRL counts tokens from the position ids (no attention mask), and the
    same seed gives the same losses as padded batches (same examples, same order)."""
    import json
    from pathlib import Path

    from emoreason.train.sft import cli

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny-cpu" / "sft.yaml"

    def run(out, *extra):
        args = ["--config", str(recipe), "--model_name_or_path", str(tiny_model_dir), "--train_records",
                str(synth_corpus), "--data_root", str(synth_corpus.parent), "--output_dir", str(out),
                "--max_steps", "2", "--per_device_train_batch_size", "3", "--tasks", "emotion_label,transcription",
                "--logging_steps", "1", "--save_strategy", "no", "--label_accuracy_split", "",
                "--feature_cache_dir", "", "--disable_tqdm", "true", "--max_train_records", "24", "--use_cpu", "true",
                "--bf16", "false", "--feature_norm_clips", "0", *extra]
        assert cli(args) == 0
        state = json.loads((out / "trainer_state.json").read_text())
        return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}

    padded = run(tmp_path / "padded")
    packed = run(tmp_path / "packed", "--pack_batches", "true")
    assert sorted(packed) == [1, 2]
    for step in (1, 2):
        assert packed[step] == pytest.approx(padded[step], rel=1e-4), (packed, padded)
