"""The model learns emotion from the voice: `recipes/tiny-cpu/sft.yaml` on the synthetic corpus, scored on held-out
voices x held-out sentences (test clips whose sentence no training clip uses) by comparing the likelihoods of the 4
label answers, with four controls (emoreason.demo.controls):

- with the clips: >= 0.8 (the issue's target, 4 classes);
- each clip's audio swapped for another test clip's with a different label: <= 0.35 (a model reading the voice
  follows the donor);
- silence of one fixed length in place of every clip: <= 0.35;
- a transcript-only classifier trained on the training transcripts: <= 0.35 (every sentence is rendered in every
  emotion, so the words say nothing).

The >= 0.8 target is NOT met on unseen voices x unseen sentences by the tiny random model. With this test's settings
(the recipe's crop augmentation, the tiny tokenizer of src/emoreason/testing/tiny.py; 2 busy cores, train ~60 s, the
whole test ~2 min): audio 0.792 (38 of 48 clips; 39 would be 0.8), swapped 0.146 (names the donor's label 0.73 of the
time), silence 0.25, transcript-only 0.25. Without the crop (the figures below) audio was 0.708. The corpus is no longer leaky (the old 0.96 came from sentences that
named the emotion), so the target stays: the test asserts the three controls and a floor well above chance, and
reports the unmet target as an expected failure with the figure instead of lowering the bar.

Why it is capped (issue 13 item 2, measured on this corpus and model):

- 48 test clips: one clip is 0.021, the binomial sd at 0.75 is 0.06. The figure also moves with the instruction
  wording each row drew: the same baseline model scores 0.625 / 0.604 / 0.667 / 0.667 with each of the 4
  emotion_label instructions (mean 0.641); the test's draw gives 0.708. Seeds 1 and 2 give 0.708 too.
- It is not sentence memorisation: the model fits the training clips (train accuracy 1.0) and does no better on the
  held-out voices' *seen* sentences (16 clips: 0.50-0.69) than on unseen ones.
- 12 of the 48 clips are blended renderings (``ambiguous_share`` 0.2: prosody 40 % of the way to another emotion,
  label = the rendered one). Every model gets about half of them (5-6 of 12) and 29-33 of the 36 clear clips, so
  0.8 (39 of 48) needs >= 33/36 clear and >= 6/12 blended.
- The information ceiling is near the target: a logistic-regression probe on the cached tower states, mean+std pooled
  over time, trained on the training clips, scores 0.854 (clear 0.94, blended 0.58; content stream alone 0.75,
  paralinguistic alone 0.69-0.73, frame-level probe averaged over frames 0.77; hidden=128 towers 0.81). Seven
  prosodic measures per clip (emoreason.datagen.acoustic.analyze: pitch level/mean/range, energy, rate, pauses,
  voicing) score 0.875 (clear 1.0, blended 0.50). The LLM is within a few clips of what the random towers carry.

Tried, one run each, audio / swapped / silence / transcript-only (silence and transcript-only were 0.25 in every run;
train runtimes 60-170 s on 2 shared cores, the same as the baseline within the load noise):

- 12 training voices (384 clips, 30 epochs): 0.729 / 0.229; every training clip re-rendered once with pitch/rate
  perturbation (``--augment 1``, 384 clips, 30 epochs): 0.688 / 0.188; a 4-head LM: 0.688.
- Random crops of the cached tower states (a contiguous window of >= 50 % of the frames, both streams, the clip's
  audio-token count shrunk to match, drawn afresh every batch; `feature_augment` of the SFT config):
  0.792 / 0.167 (instruction mean 0.734); seed 1: 0.729 / 0.167 (instruction mean 0.724, no gain over that seed's
  baseline). Crops of >= 30 %: 0.771 / 0.167 (instruction mean 0.771); seed 1: 0.750 / 0.146; seed 2:
  0.750 / 0.125 (the one consistent gain: 2-3 clips on each seed); 90 epochs: 0.771 / 0.146; 30 epochs:
  0.708 / 0.146; with label smoothing 0.1: 0.708 / 0.167.
- Crop 50 % + time masking 20 % (spans of 5 frames set to the clip's mean frame): 0.750 / 0.250; crop 50 % + feature
  noise 0.2 sd: 0.771 / 0.125; time masking 30 % alone: 0.646 / 0.188; feature noise 0.3 sd alone: 0.729 / 0.208.
- Content-stream dropout (the Whisper states of half the clips replaced by their time average): 0.708 / 0.167.
- The instruction drawn afresh from the pool every batch: 0.688 / 0.229 alone; with crop 50 %: 0.771 / 0.188 and
  with crop 30 %: 0.771 / 0.146 (the model no longer depends on the wording: 0.75-0.77 with each instruction).
- 30 epochs instead of 60: 0.729 / 0.125 (train 24 s instead of 61 s); lr 5e-4 with crop 50 %: 0.750 / 0.167.
- Utterance-level statistics in the projector (every audio token plus a linear map of the clip's mean and std fused
  frame; a modeling change, tried by patching, not landed) with crop 30 %: 0.771 / 0.146.

Measured again on this code (the recipe as it stands: crop 30 %, the tiny tokenizer; deterministic per seed, so
reruns repeat clip for clip), seeds 0 / 1 / 2: 0.792 / 0.771 / 0.792 (38 / 37 / 38 of 48; clear 31-32 of 36, blended
5-7 of 12; swapped 0.146-0.167). Scored with each of the 4 instruction wordings and averaged: 0.750 / 0.745 / 0.760,
so the gap is 2 clips on the test's own draw and ~0.05 over wordings. Three regularisers on top, seeds 0-2 each, all
lower (mean audio; clips only the recipe got right vs only the variant, pooled over seeds, two-sided sign test):
weight decay 0.1 0.715 (15 vs 5, p 0.04); the instruction drawn afresh every batch 0.722 (14 vs 5, p 0.06); attention
dropout 0.1 in the LM 0.722 (12 vs 3, p 0.035). Pooling (the projector's stack factor, 4 here): 8 frames per audio
token 0.750 / 0.771 / 0.729 (12 vs 7), 2 frames 0.667 / 0.750 / 0.729 (15 vs 5); blended clips stay at 5-6 of 12. A corpus with 10 sentences per speaker (64 test clips, 240 training
clips) scores 0.766 / 0.750 / 0.719: more test clips, no closer to 0.8. Of the 13 clear-clip errors over the three
seeds, 7 are the female test voice's neutral heard as happy and 2 the male one's happy heard as neutral: the two
emotions differ most in pitch level, which the model judges against the training voices' baselines.

None reaches 0.8 (best 0.792, one seed); crops of >= 30 % of the frames gain 0.04-0.06 on all three seeds. What
would move the figure: more test clips (or scoring each clip with every instruction wording) to measure a few-clip
difference at all, and encoders whose states carry the prosody (the probes above put random towers at about 0.85 on
this test, explicit prosody at 0.875).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHANCE = 0.25


@pytest.mark.slow
def test_tiny_recipe_learns_emotion_from_the_voice_on_unseen_voices_and_sentences(tiny_model_dir, synth_corpus,
                                                                                    tmp_path):
    from emoreason.demo.controls import learning_controls

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    common = ["--config", "recipes/tiny-cpu/sft.yaml", "--model_name_or_path", str(tiny_model_dir),
              "--train_records", str(synth_corpus), "--data_root", str(synth_corpus.parent),
              "--feature_cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "run"),
              "--disable_tqdm", "true"]
    for cmd in (["cache-features", *common], ["train", "sft", *common]):
        proc = subprocess.run([sys.executable, "-m", "emoreason.cli", *cmd], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-6000:]
    results = json.loads((tmp_path / "run" / "all_results.json").read_text())
    assert results["feature_cache_miss_batches"] == 0 and results["feature_cache_hit_batches"] > 0
    assert results["feature_norm_clips"] > 0, results

    controls = learning_controls(tmp_path / "run", synth_corpus, synth_corpus.parent)
    print("learning controls (held-out voices x held-out sentences):", json.dumps(controls),
          "train_runtime", results["train_runtime"])
    assert controls["clips"] >= 40
    assert controls["transcript_only"] <= CHANCE + 0.10, controls
    assert controls["silence"] <= CHANCE + 0.10, controls
    assert controls["swapped_audio"] <= CHANCE + 0.10, controls
    assert controls["audio"] >= 0.6, controls  # well above chance: the voice is used
    if controls["audio"] < 0.8:
        pytest.xfail(f"target 0.8 on unseen voices x unseen sentences not reached: {controls['audio']:.3f} "
                     "(issue 13 item 2; the controls above passed)")
