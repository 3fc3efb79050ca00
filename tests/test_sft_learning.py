"""The model learns emotion from the voice: `recipes/tiny-cpu/sft.yaml` on the synthetic corpus, scored on held-out
voices x held-out sentences (test clips whose sentence no training clip uses) by comparing the likelihoods of the 4
label answers, with four controls (emoreason.demo.controls):

- with the clips: >= 0.8 (the issue's target, 4 classes);
- each clip's audio swapped for another test clip's with a different label: <= 0.35 (a model reading the voice
  follows the donor);
- silence of one fixed length in place of every clip: <= 0.35;
- a transcript-only classifier trained on the training transcripts: <= 0.35 (every sentence is rendered in every
  emotion, so the words say nothing).

The model is the tiny one with its paralinguistic tower warmed up on prosody (emoreason.demo.prosody_tower: label-free
regression of pitch, voicing, energy and the clip measures of emoreason.datagen.acoustic, on the training clips only),
the stand-in for a pretrained WavLM. Figures (48 clips, one clip = 0.021; 2 busy cores, OMP_NUM_THREADS=1; audio /
swapped / silence / transcript-only):

- warmed tower (the test): SFT seeds 0 / 1 / 2: 0.875 / 0.833 / 0.875, swapped 0.06-0.10 (the answer names the
  donor's label 0.83 of the time), silence 0.25, transcript-only 0.25; a second warm-up seed, SFT seed 0: 0.875.
- the random tower (the model before the warm-up; the same recipe): 0.792 / 0.771 / 0.792, swapped 0.15-0.17. Every
  training-side change we tried on it stayed below 0.8 (each seeds 0-2, mean audio): weight decay 0.1 0.715, the
  instruction redrawn every batch 0.722, attention dropout 0.1 0.722, 8 or 2 frames per audio token 0.750 / 0.715,
  a corpus with 10 sentences per voice 0.745; one run each: 12 training voices 0.729, pitch/rate-perturbed
  re-renderings 0.688, time masking, feature noise, content-stream dropout, label smoothing, utterance statistics in
  the projector 0.65-0.77. Crops of the cached tower states (the recipe's `feature_augment: {crop: 0.3}`) were the
  one consistent gain (+0.04-0.06 on every seed).
- why: a logistic-regression probe on the random tower's time-pooled states scores 0.69 on these clips; seven
  prosodic measures per clip score 0.875 (every clear clip right, half of the 12 blended ones). The random tower
  keeps too little prosody for the unseen voices: most errors were the female test voice's neutral heard as happy
  (pitch level judged against the training voices). A warm-up on frame-level pitch, voicing and energy alone gave
  0.833 / 0.729 / 0.8125 (its tower's quality varied with the warm-up seed); adding the clip-level measures gave the
  figures above. 0.875 is about the ceiling: the 12 blended clips (prosody 40 % of the way to another emotion) are
  right about half the time for every model and for the prosodic measures.
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
def test_tiny_recipe_learns_emotion_from_the_voice_on_unseen_voices_and_sentences(prosody_tiny_model_dir,
                                                                                    synth_corpus, tmp_path):
    from emoreason.demo.controls import learning_controls

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    common = ["--config", "recipes/tiny-cpu/sft.yaml", "--model_name_or_path", str(prosody_tiny_model_dir),
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
    assert controls["audio"] >= 0.8, controls
