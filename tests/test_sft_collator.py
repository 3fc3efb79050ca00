"""The SFT collator: loss on the response only, right padding, audio batched to the longest clip, safe paths."""

from __future__ import annotations

import pytest
import torch

from emoreason.train.collators import IGNORE_INDEX, SFTCollator
from emoreason.data.schema import UnsafePathError, read_records
from emoreason.train.tasks import build_task_examples, parse_task_specs


@pytest.fixture(scope="module")
def rows(synth_corpus):
    records = read_records(synth_corpus)[:4]
    return build_task_examples(parse_task_specs("emotion_label,transcription"), records, split=None)


def test_labels_cover_exactly_the_response_and_padding_is_right(tiny, synth_corpus, rows):
    model, processor = tiny
    batch = SFTCollator(processor, synth_corpus.parent)(rows[:3])
    tok = processor.tokenizer
    for i, row in enumerate(rows[:3]):
        target = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX].tolist()
        assert tok.decode(target) == row["response"] + "<|im_end|>\n"
        mask = batch["attention_mask"][i]
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()  # right padding
        assert (batch["input_ids"][i, length:] == tok.pad_token_id).all()
        assert (batch["labels"][i, length:] == IGNORE_INDEX).all()
        # the audio placeholders (prompt side) are never trained on
        audio = batch["input_ids"][i] == processor.audio_token_id
        assert audio.sum() > 0 and (batch["labels"][i][audio] == IGNORE_INDEX).all()
    # audio padded to the batch's longest clip, not to 30 s
    assert batch["input_values"].shape[1] == int(batch["input_values_mask"].sum(-1).max()) < 16000 * 30
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_max_length_cuts_the_response_never_the_prompt(tiny, synth_corpus, rows):
    _, processor = tiny
    full = SFTCollator(processor, synth_corpus.parent)(rows[:1])
    prompt_len = int((full["labels"][0] == IGNORE_INDEX).sum())
    cut = SFTCollator(processor, synth_corpus.parent, max_length=prompt_len + 2)(rows[:1])
    assert cut["input_ids"].shape[1] == prompt_len + 2
    assert int((cut["labels"][0] != IGNORE_INDEX).sum()) == 2
    with pytest.raises(ValueError, match="prompt alone"):
        SFTCollator(processor, synth_corpus.parent, max_length=prompt_len - 1)(rows[:1])


def test_silence_has_one_fixed_length_and_no_signal(tiny, synth_corpus, rows):
    _, processor = tiny
    silent = SFTCollator(processor, synth_corpus.parent, silence_seconds=1.5)(rows[:2])
    assert silent["input_values"].abs().max() == 0
    assert silent["input_values_mask"].sum(-1).tolist() == [24000, 24000]  # duration no longer tells the clip apart
    tokens = (silent["input_ids"] == processor.audio_token_id).sum(-1)
    assert tokens[0] == tokens[1] == processor.num_audio_tokens(24000)


def test_audio_paths_stay_under_the_data_root(tiny, synth_corpus, rows):
    _, processor = tiny
    bad = {**rows[0], "audio": "../../etc/passwd"}
    with pytest.raises(UnsafePathError):
        SFTCollator(processor, synth_corpus.parent)([bad])
