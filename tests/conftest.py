"""Shared fixtures: a tiny complete model and the espeak-ng corpus, built once per test session.

Both are built through the same code paths real checkpoints and corpora take (``build_from_components`` +
``save_pretrained``; records files under a data root), so tests load them like a user would.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from emoreason.testing.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory) -> Path:
    """Path of the manifest (records.jsonl); its folder is the data root."""
    from emoreason.testing.synth_corpus import synthesize

    return synthesize(tmp_path_factory.mktemp("synth-corpus"))


@pytest.fixture(scope="session")
def prosody_tiny_model_dir(tmp_path_factory, tiny_model_dir, synth_corpus) -> Path:
    """The tiny model with its random paralinguistic tower warmed up on the training clips' prosody (label-free; the
    stand-in for a pretrained WavLM: emoreason.demo.prosody_tower), for tests that measure what the LLM learns."""
    from emoreason.demo.prosody_tower import warm_up_model

    out = tmp_path_factory.mktemp("tiny-prosody")
    warm_up_model(tiny_model_dir, synth_corpus, out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, processor) loaded from the tiny checkpoint, in eval mode. Do not train this shared instance."""
    from emoreason.modeling import load_pretrained

    model, processor = load_pretrained(tiny_model_dir)
    return model.eval(), processor
