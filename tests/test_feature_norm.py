"""The projector's global mean-variance normalisation: identity until measured, measured right, saved with the model."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from emoreason.train.collators import SFTCollator
from emoreason.data.schema import read_records
from emoreason.modeling import EmoReasonConfig, load_pretrained
from emoreason.train.feature_cache import FeatureCache, cache_features, encode_clip
from emoreason.train.feature_norm import fit_feature_norm
from emoreason.train.tasks import build_task_examples, parse_task_specs


@pytest.fixture(scope="module")
def rows(synth_corpus):
    records = [r for r in read_records(synth_corpus) if r.split == "train"][:5]
    return build_task_examples(parse_task_specs("emotion_label"), records, split=None)


@pytest.fixture()
def fresh(tiny_model_dir):
    """A private copy of the tiny model (these tests change its buffers)."""
    model, processor = load_pretrained(tiny_model_dir)
    return model.eval(), processor


def test_unmeasured_normalisation_is_the_identity(fresh, synth_corpus, rows):
    model, processor = fresh
    projector = model.model.audio_encoder.projector
    assert model.config.feature_norm == "global_mvn" and not projector.feature_norm_fitted
    batch = SFTCollator(processor, synth_corpus.parent)(rows[:2])
    with torch.no_grad():
        normalised = model(**batch).loss
        projector.feature_norm = "none"
        plain = model(**batch).loss
    assert torch.equal(normalised, plain)


def test_statistics_are_the_training_frames_moments(fresh, synth_corpus, rows):
    model, processor = fresh
    summary = fit_feature_norm(model, processor, rows, synth_corpus.parent, show_progress=False)
    projector = model.model.audio_encoder.projector
    states = [encode_clip(model, processor, processor.load(str(synth_corpus.parent / r["audio"]))) for r in rows]
    content = torch.cat([s["content"] for s in states]).double()
    para = torch.cat([s["paralinguistic"] for s in states], dim=1).double()  # (layers, frames, D)
    assert summary == {"clips": len(rows), "frames": content.shape[0], "from_cache": 0}
    assert projector.feature_norm_fitted and int(projector.feature_norm_frames) == content.shape[0]
    torch.testing.assert_close(projector.content_mean.double(), content.mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(projector.content_std.double(), content.std(0, unbiased=False), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(projector.paralinguistic_std.double(), para.std(1, unbiased=False), atol=1e-5,
                               rtol=1e-4)
    # what the projector then sees: zero mean, unit variance per dimension over those frames
    normalised = projector.normalize_content(content.float())
    assert normalised.mean(0).abs().max() < 1e-3 and (normalised.std(0, unbiased=False) - 1).abs().max() < 1e-3


def test_cached_and_live_measurements_agree(fresh, tiny_model_dir, synth_corpus, rows, tmp_path):
    model, processor = fresh
    records = [r for r in read_records(synth_corpus) if r.id in {row["clip_id"] for row in rows}]
    cache_features(model, processor, records, synth_corpus.parent, tmp_path)
    cache = FeatureCache.for_model(tmp_path, model, processor)
    cached = fit_feature_norm(model, processor, rows, synth_corpus.parent, feature_cache=cache, show_progress=False)
    from_cache = model.model.audio_encoder.projector.content_std.clone()
    live, _ = load_pretrained(tiny_model_dir)
    fit_feature_norm(live, processor, rows, synth_corpus.parent, show_progress=False)
    assert cached["from_cache"] == len(rows)
    torch.testing.assert_close(from_cache, live.model.audio_encoder.projector.content_std)


def test_statistics_are_saved_and_loaded_with_the_model(fresh, synth_corpus, rows, tmp_path):
    model, processor = fresh
    fit_feature_norm(model, processor, rows[:2], synth_corpus.parent, show_progress=False)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert "model.audio_encoder.projector.content_std" in set(f.keys())
    loaded, _ = load_pretrained(tmp_path)
    for name in ("content_mean", "content_std", "paralinguistic_mean", "paralinguistic_std", "feature_norm_frames"):
        assert torch.equal(getattr(loaded.get_audio_encoder().projector, name),
                           getattr(model.get_audio_encoder().projector, name)), name


def test_a_lora_adapter_carries_the_statistics(fresh, synth_corpus, rows):
    from peft import get_peft_model_state_dict

    from emoreason.modeling.lora import apply_lora

    model, processor = fresh
    fit_feature_norm(model, processor, rows[:2], synth_corpus.parent, show_progress=False)
    peft_model = apply_lora(model, r=4)
    saved = get_peft_model_state_dict(peft_model)
    assert any(k.endswith("projector.content_std") for k in saved), sorted(saved)[:10]


def test_feature_norm_values_are_checked():
    with pytest.raises(ValueError, match="feature_norm"):
        EmoReasonConfig(feature_norm="batch")


# -- distributed start-up: measured once on the main process, shared with every rank ------------------------------
def _fit_on_rank(rank, world_size, store, model_dir, rows, data_root, out):
    import torch.distributed as dist

    from emoreason.train.feature_norm import STAT_BUFFERS, fit_feature_norm_once

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        model, processor = load_pretrained(model_dir)
        # Only the main process may read the clips: the other rank gets none (it would raise if it measured).
        summary = fit_feature_norm_once(model.eval(), processor, rows if rank == 0 else [], data_root,
                                        show_progress=False, device="cpu")
        stats = {name: getattr(model.model.audio_encoder.projector, name).clone() for name in STAT_BUFFERS}
        try:  # a failure on the main process reaches every rank instead of leaving them waiting
            fit_feature_norm_once(model, processor, [], data_root, show_progress=False)
            failure = None
        except (ValueError, RuntimeError) as exc:
            failure = f"{type(exc).__name__}: {exc}"
        torch.save({"summary": summary, "stats": stats, "failure": failure}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_fit_runs_on_the_main_process_and_is_broadcast(tiny_model_dir, synth_corpus, rows, tmp_path):
    import torch.multiprocessing as mp

    from emoreason.train.feature_norm import STAT_BUFFERS

    model, processor = load_pretrained(tiny_model_dir)
    expected = fit_feature_norm(model.eval(), processor, rows, synth_corpus.parent, show_progress=False)
    projector = model.model.audio_encoder.projector
    assert not torch.equal(projector.content_std, torch.ones_like(projector.content_std))  # control: not identity
    mp.spawn(_fit_on_rank, args=(2, str(tmp_path / "store"), str(tiny_model_dir), rows, str(synth_corpus.parent),
                                 str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for result in results:
        assert result["summary"] == expected
        for name in STAT_BUFFERS:
            torch.testing.assert_close(result["stats"][name], getattr(projector, name), atol=1e-6, rtol=1e-5)
    assert results[0]["failure"].startswith("ValueError: fit_feature_norm: no clips")
    assert results[1]["failure"].startswith("RuntimeError: feature normalisation failed on the main process")

