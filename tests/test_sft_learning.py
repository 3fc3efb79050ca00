"""The model learns emotion from the voice: `recipes/tiny-cpu/sft.yaml` on the synthetic corpus, scored on held-out
voices x held-out sentences (test clips whose sentence no training clip uses) by comparing the likelihoods of the 4
label answers, with four controls (emoreason.demo.controls):

- with the clips: >= 0.8 (the issue's target, 4 classes);
- each clip's audio swapped for another test clip's with a different label: <= 0.35 (a model reading the voice
  follows the donor);
- silence of one fixed length in place of every clip: <= 0.35;
- a transcript-only classifier trained on the training transcripts: <= 0.35 (every sentence is rendered in every
  emotion, so the words say nothing).

The >= 0.8 target is NOT met on unseen voices x unseen sentences by the tiny random model (measured with this test's
settings on 2 busy cores: audio 0.708, swapped 0.188 (names the donor's label 0.60 of the time), silence 0.25,
transcript-only 0.25). Tried, one run each: 12 training voices (384 clips, 30 epochs) 0.729 / swapped 0.229; every
training clip re-rendered once with pitch/rate perturbation (`--augment 1`, 384 clips, 30 epochs) 0.688 / swapped
0.188. The corpus is no longer leaky (the old 0.96 came from sentences that named the emotion), so the target stays:
the test asserts the three controls and a floor well above chance, and reports the unmet target as an expected
failure with the figure instead of lowering the bar.
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
