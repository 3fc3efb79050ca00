"""Cached encoder features: same loss as live towers, keyed by an encoder fingerprint, resumable, with fallback."""

from __future__ import annotations

import json

import pytest
import torch

from emoreason.train.collators import SFTCollator
from emoreason.data.schema import read_records
from emoreason.modeling import load_pretrained
from emoreason.train.feature_cache import FeatureCache, cache_features, encoder_fingerprint
from emoreason.train.tasks import build_task_examples, parse_task_specs


@pytest.fixture(scope="module")
def records(synth_corpus):
    return read_records(synth_corpus)[:6]


@pytest.fixture(scope="module")
def cache_dir(tiny, synth_corpus, records, tmp_path_factory):
    model, processor = tiny
    out = tmp_path_factory.mktemp("feature-cache")
    cache_features(model, processor, records, synth_corpus.parent, out, shard_size=4)
    return out


def test_cached_batches_match_live_towers(tiny, synth_corpus, records, cache_dir):
    model, processor = tiny
    cache = FeatureCache.for_model(cache_dir, model, processor)
    assert len(cache) == len(records)
    assert len(list(cache.folder.glob("shard-*.safetensors"))) == 2  # 6 clips, 4 per shard
    rows = build_task_examples(parse_task_specs("emotion_label"), records, split=None)
    live = SFTCollator(processor, synth_corpus.parent)(rows)
    collator = SFTCollator(processor, synth_corpus.parent, feature_cache=cache)
    cached = collator(rows)
    assert "input_values" not in cached and "content_states" in cached and collator.cache_hits == 1
    assert torch.equal(live["input_ids"], cached["input_ids"]) and torch.equal(live["labels"], cached["labels"])
    assert torch.equal(live["input_features_mask"], cached["input_features_mask"])
    with torch.no_grad():
        live_out, cached_out = model(**live), model(**cached)
    # Whisper states are batch-invariant; WavLM group-norm states differ slightly with padding (cache = clip alone).
    assert torch.allclose(live_out.loss, cached_out.loss, atol=2e-3)
    single = SFTCollator(processor, synth_corpus.parent)(rows[:1])
    with torch.no_grad():
        assert torch.allclose(model(**single).loss, model(**SFTCollator(
            processor, synth_corpus.parent, feature_cache=cache)(rows[:1])).loss, atol=1e-5)


def test_a_missing_clip_falls_back_to_live_audio(tiny, synth_corpus, records, cache_dir):
    model, processor = tiny
    cache = FeatureCache.for_model(cache_dir, model, processor)
    extra = read_records(synth_corpus)[10]
    rows = build_task_examples(parse_task_specs("emotion_label"), [records[0], extra], split=None)
    collator = SFTCollator(processor, synth_corpus.parent, feature_cache=cache)
    batch = collator(rows)
    assert "input_values" in batch and "content_states" not in batch
    assert collator.cache_misses == 1


def test_changing_an_encoder_invalidates_the_cache(tiny_model_dir, synth_corpus, records, cache_dir):
    model, processor = load_pretrained(tiny_model_dir)
    before = encoder_fingerprint(model, processor)
    assert FeatureCache.for_model(cache_dir, model, processor).index  # same encoders: the cache is found
    with torch.no_grad():
        model.model.audio_encoder.paralinguistic_encoder.encoder.layers[0].attention.q_proj.weight.add_(1e-3)
    after = encoder_fingerprint(model, processor)
    assert after != before
    stale = FeatureCache.for_model(cache_dir, model, processor)
    assert len(stale) == 0  # nothing read from the old encoder's folder
    # a change outside the towers (projector, LM) keeps the fingerprint
    model2, _ = load_pretrained(tiny_model_dir)
    with torch.no_grad():
        model2.model.audio_encoder.projector.linear_1.weight.add_(1.0)
    assert encoder_fingerprint(model2, processor) == before


def test_caching_resumes_without_recomputing(tiny, synth_corpus, records, tmp_path):
    model, processor = tiny
    folder = cache_features(model, processor, records[:3], synth_corpus.parent, tmp_path, shard_size=2)
    first = json.loads((folder / "index.json").read_text())
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*")}
    cache_features(model, processor, records, synth_corpus.parent, tmp_path, shard_size=2)
    index = json.loads((folder / "index.json").read_text())
    assert set(index) == {r.id for r in records}
    assert all(index[k] == v for k, v in first.items())
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in folder.glob("shard-*") if p.name in stamps)


def test_trainable_encoders_refuse_the_cache(tiny_model_dir, cache_dir):
    model, processor = load_pretrained(tiny_model_dir)
    model.config.train_paralinguistic_encoder = True
    model.model.config.train_paralinguistic_encoder = True
    with pytest.raises(ValueError, match="trainable"):
        FeatureCache.for_model(cache_dir, model, processor)


def test_batched_encoding_equals_each_clip_alone(tiny, synth_corpus):
    """cache-features and the normalisation fit encode clips in batches: each clip's states (cut at its own length)
    are what encoding it alone gives, whatever it is batched with (group-norm WavLM included)."""
    from emoreason.train.feature_cache import encode_clip, encode_clips, encode_in_batches

    model, processor = tiny
    wavs = [processor.load(str(synth_corpus.parent / r.audio)) for r in read_records(synth_corpus)[:5]]
    assert len({w.shape[0] for w in wavs}) > 1
    alone = [encode_clip(model, processor, w) for w in wavs]
    batched = encode_clips(model, processor, wavs)
    streamed = dict(encode_in_batches(model, processor, lambda i: wavs[i], list(range(5)), batch_size=2))
    for i, one in enumerate(alone):
        for states in (batched[i], streamed[i]):
            assert states["content"].shape == one["content"].shape
            assert states["paralinguistic"].shape == one["paralinguistic"].shape
            assert int(states["num_samples"]) == int(one["num_samples"])
            torch.testing.assert_close(states["content"], one["content"], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(states["paralinguistic"], one["paralinguistic"], atol=1e-5, rtol=1e-4)


def test_cache_features_calls_each_tower_once_per_batch(tiny, synth_corpus, tmp_path, monkeypatch):
    """One tower call per batch of clips, not per clip (the first GPU run: 6 clips/s, one clip per call)."""
    model, processor = tiny
    inner = model.model.audio_encoder
    calls = []
    original = type(inner).encode_content
    monkeypatch.setattr(type(inner), "encode_content", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    records = read_records(synth_corpus)[:10]
    cache_features(model, processor, records, synth_corpus.parent, tmp_path, batch_size=4)
    assert len(calls) == 3  # 10 clips, 4 per call
