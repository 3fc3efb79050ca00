"""One record -> conversation builder for every stage (emoreason.data.conversation).

The parity test builds the prompt of one dialogue record through each stage's own code path (SFT rows + collator,
GRPO rows, DPO pairs + preference collator, the evaluator's strategy context) and checks they are the same messages.
"""

from __future__ import annotations

import base64
import io
import random

import numpy as np
import pytest
import soundfile as sf

from emoreason.data.audio import AudioError, load_audio, write_wav
from emoreason.data.conversation import (
    INSTRUCTION_POOLS,
    build_conversation,
    choose_instruction,
    input_audio_part,
    record_conversation,
)
from emoreason.data.schema import EmotionRecord, write_records

SYSTEM = "You judge emotion in speech."
INSTRUCTION = "What emotion does the speaker express? Explain your reasoning, then answer."
CONTEXT = ["A: We lost the match.", "B: All of it? After all that training?"]


def tone(seconds=0.6, rate=16_000, freq=220.0):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture()
def dialogue(tmp_path):
    """A records file holding one dialogue record (with a DPO rejected response) and its data root."""
    root = tmp_path / "data"
    write_wav(root / "clips" / "d1.wav", tone())
    record = EmotionRecord(
        id="d1", audio="clips/d1.wav", duration=0.6, corpus="meld", split="train", label="sad",
        distribution={"sad": 0.75, "neutral": 0.25}, transcript="All of it.", context=list(CONTEXT),
        task="emotion_reasoning", instruction=INSTRUCTION,
        response="<think>Low, slow voice.</think><answer>sad</answer>",
        meta={"rejected": [{"text": "<think>Loud and fast.</think><answer>angry</answer>", "kind": "wrong_emotion"}]},
    )
    path = tmp_path / "records.jsonl"
    write_records([record], path)
    return record, path, root


def without_audio(messages):
    """The messages with the user turn's audio part replaced by a marker (each stage carries the clip its own way)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = ["<clip>" if p.get("type") in ("audio", "input_audio", "audio_url") else p for p in content]
        out.append({**m, "content": content})
    return out


def test_sft_grpo_dpo_and_eval_build_the_same_prompt(tiny, dialogue):
    from emoreason.train.collators import SFTCollator
    from emoreason.eval.strategies import StrategyContext
    from emoreason.eval.prompts import PromptSet
    from emoreason.train.dpo import load_pairs
    from emoreason.train.dpo_trainer import PreferenceCollator
    from emoreason.train.grpo import load_examples
    from emoreason.train.tasks import TaskSpec, build_task_examples

    _, processor = tiny
    record, path, root = dialogue

    sft_row = build_task_examples([TaskSpec("emotion_reasoning")], str(path), split="train")[0]
    sft = SFTCollator(processor, root, system_prompt=SYSTEM).messages(sft_row)
    grpo_rows = load_examples(str(path), str(root), "train", system_prompt=SYSTEM)
    grpo = grpo_rows[0]["prompt"]
    # GRPO's rows must survive Arrow, as TRL receives them (a str system turn beside list contents did not).
    import datasets
    assert datasets.Dataset.from_list(grpo_rows)[0]["prompt"][0]["content"][0]["text"] == SYSTEM
    dpo_row = load_pairs(str(path), str(root), "train")[0]
    dpo = PreferenceCollator(processor, root, system_prompt=SYSTEM).messages(dpo_row)
    ctx = StrategyContext(client=None, labels=("neutral", "sad"), prompts=PromptSet(system=SYSTEM,
                          styles={"cot": INSTRUCTION}), data_root=root)
    evaluated = ctx.messages(record, "cot")

    expected = without_audio(record_conversation(record, INSTRUCTION, system_prompt=SYSTEM))
    for name, messages in (("sft", sft), ("grpo", grpo), ("dpo", dpo), ("eval", evaluated)):
        assert without_audio(messages) == expected, name
        assert [m["role"] for m in messages] == ["system", "user"], name
        text = messages[-1]["content"][1]["text"]
        assert text.splitlines() == [f"Context: {c}" for c in CONTEXT] + [INSTRUCTION], name

    # ... and each stage's audio part is the record's clip.
    clip = record.audio_path(root)
    assert sft[-1]["content"][0] == dpo[-1]["content"][0] == {"type": "audio"}
    assert grpo[-1]["content"][0] == {"type": "audio", "audio": str(clip)}
    sent = evaluated[-1]["content"][0]["input_audio"]
    assert sent["format"] == "wav" and base64.b64decode(sent["data"]) == clip.read_bytes()
    # The model sees one text: the server renders the evaluator's request as the collator renders training rows.
    assert processor.apply_chat_template(evaluated, add_generation_prompt=True) == \
        processor.apply_chat_template(sft, add_generation_prompt=True)
    # The SFT target is the record's response, appended as the assistant turn.
    with_target = SFTCollator(processor, root, system_prompt=SYSTEM).messages(sft_row, sft_row["response"])
    assert with_target[:-1] == sft and with_target[-1]["content"][0]["text"] == record.response


def test_context_changes_the_prompt_and_system_is_optional():
    plain = build_conversation(INSTRUCTION)
    assert plain == [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": INSTRUCTION}]}]
    assert build_conversation(INSTRUCTION, context=CONTEXT) != plain
    with pytest.raises(ValueError, match="instruction"):
        build_conversation("  ")


def test_choose_instruction_keeps_the_records_own_for_its_task_only():
    pool = INSTRUCTION_POOLS["emotion_reasoning"]
    own = EmotionRecord(id="a", audio="a.wav", duration=1.0, corpus="x", instruction="Own words?", task=None)
    assert choose_instruction(own, "emotion_reasoning", pool, random.Random(0)) == "Own words?"
    drawn = choose_instruction(own, "emotion_label", INSTRUCTION_POOLS["emotion_label"], random.Random(0))
    assert drawn in INSTRUCTION_POOLS["emotion_label"]
    other = EmotionRecord(id="b", audio="b.wav", duration=1.0, corpus="x", instruction="Caption?", task="captioning")
    assert choose_instruction(other, "emotion_reasoning", pool, random.Random(0)) in pool
    # Seeded: the same generator state draws the same instruction.
    assert choose_instruction(other, "emotion_reasoning", pool, random.Random(3)) == \
        choose_instruction(other, "emotion_reasoning", pool, random.Random(3))


@pytest.mark.parametrize("fmt", ["wav", "mp3"])
def test_wav_and_mp3_go_as_they_are(tmp_path, fmt):
    buffer = io.BytesIO()
    sf.write(buffer, tone(), 16_000, format=fmt.upper())
    path = tmp_path / f"clip.{fmt}"
    path.write_bytes(buffer.getvalue())
    for source in (path, buffer.getvalue()):  # a file, or bytes (format sniffed)
        part = input_audio_part(source)
        assert part["type"] == "input_audio" and part["input_audio"]["format"] == fmt
        assert base64.b64decode(part["input_audio"]["data"]) == buffer.getvalue()


@pytest.mark.parametrize("fmt", ["flac", "ogg"])
def test_other_formats_become_wav(tmp_path, fmt):
    wave = tone(rate=22_050)
    path = tmp_path / f"clip.{fmt}"
    sf.write(path, wave, 22_050, format=fmt.upper())
    part = input_audio_part(path)
    assert part["input_audio"]["format"] == "wav"
    raw = base64.b64decode(part["input_audio"]["data"])
    assert raw[:4] == b"RIFF" and raw[8:12] == b"WAVE"
    decoded, rate = sf.read(io.BytesIO(raw), dtype="float32")
    assert rate == 16_000
    reference = load_audio(path)
    assert decoded.shape == reference.shape and np.abs(decoded - reference).max() < 0.02


def test_the_bytes_decide_the_format_not_the_suffix(tmp_path):
    path = tmp_path / "mislabelled.wav"
    sf.write(path, tone(), 16_000, format="FLAC")
    raw = base64.b64decode(input_audio_part(path)["input_audio"]["data"])
    assert raw[:4] == b"RIFF" and raw != path.read_bytes()


def test_undecodable_audio_is_a_clear_error(tmp_path):
    path = tmp_path / "clip.flac"
    path.write_bytes(b"not audio at all")
    with pytest.raises(AudioError, match="unreadable"):
        input_audio_part(path)
