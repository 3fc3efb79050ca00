"""The dual-encoder model: round trips, assembly from parts, audio actually used, placeholders, generation, LoRA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emoreason.modeling import (
    AudioPlaceholderError,
    EmoReasonConfig,
    EmoReasonForConditionalGeneration,
    EmoReasonProcessor,
    load_pretrained,
)
from emoreason.modeling.lora import apply_lora

SR = 16_000


def tone(seconds: float, freq: float = 220.0, amp: float = 0.3, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).normal(0, 0.01, t.shape)
    return (amp * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def prompt(processor: EmoReasonProcessor, n: int = 1) -> list[str]:
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "What emotion is this?"}]}]
    return [processor.apply_chat_template(messages, add_generation_prompt=True)] * n


@pytest.fixture(scope="module")
def batch(tiny):
    _, processor = tiny
    return processor(prompt(processor, 2), [tone(1.3), tone(2.1, freq=330.0, amp=0.5)])


def test_save_load_round_trip_is_exact(tiny, batch, tmp_path):
    model, processor = tiny
    with torch.no_grad():
        before = model(**batch).logits
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    reloaded, reprocessor = load_pretrained(tmp_path)
    again = reprocessor(prompt(reprocessor, 2), [tone(1.3), tone(2.1, freq=330.0, amp=0.5)])
    for key in batch:
        assert torch.equal(batch[key], again[key]), key
    with torch.no_grad():
        after = reloaded.eval()(**again).logits
    assert torch.equal(before, after)


def test_a_pickled_checkpoint_is_refused_and_unsafe_load_options_are_errors(tiny, tmp_path):
    from emoreason.modeling import safe_load_kwargs

    model, processor = tiny
    model.config.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # pickled weights only
    assert list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(OSError, match="safetensors"):
        load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="safetensors"):
        safe_load_kwargs(use_safetensors=False)
    with pytest.raises(ValueError, match="trust_remote_code"):
        safe_load_kwargs(trust_remote_code=True)
    # Hub kernels (downloaded code; transformers >= 5.25 turns them on by default) stay off unless asked for.
    assert safe_load_kwargs(dtype=torch.float32) == {
        "use_safetensors": True, "trust_remote_code": False, "use_kernels": False, "dtype": torch.float32,
    }
    assert safe_load_kwargs(use_kernels=True)["use_kernels"] is True


def test_every_weight_load_goes_through_the_safe_options(tiny_model_dir, monkeypatch):
    """Assembling from parts and loading a checkpoint both pass use_safetensors / no remote code / no Hub kernels."""
    from transformers import PreTrainedModel

    from emoreason.modeling import build_from_components

    seen = []
    original = PreTrainedModel.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):
        seen.append((cls.__name__, {k: kwargs.get(k) for k in ("use_safetensors", "trust_remote_code", "use_kernels")}))
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(spy))
    load_pretrained(tiny_model_dir)
    parts = tiny_model_dir / "components"
    build_from_components(parts / "whisper", parts / "wavlm", parts / "lm")
    assert len(seen) >= 4, seen
    for name, options in seen:
        assert options == {"use_safetensors": True, "trust_remote_code": False, "use_kernels": False}, name


def test_auto_classes_resolve_the_checkpoint(tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

    assert isinstance(AutoConfig.from_pretrained(tiny_model_dir), EmoReasonConfig)
    assert isinstance(AutoModelForCausalLM.from_pretrained(tiny_model_dir), EmoReasonForConditionalGeneration)
    assert isinstance(AutoProcessor.from_pretrained(tiny_model_dir), EmoReasonProcessor)
    assert AutoConfig.from_pretrained(tiny_model_dir).auto_map == {}


def test_from_components_loads_each_part_from_its_own_checkpoint(tiny, tiny_model_dir):
    from transformers import AutoModelForCausalLM, WavLMModel, WhisperForConditionalGeneration

    model, processor = tiny
    parts = tiny_model_dir / "components"
    whisper = WhisperForConditionalGeneration.from_pretrained(parts / "whisper")
    wavlm = WavLMModel.from_pretrained(parts / "wavlm")
    lm = AutoModelForCausalLM.from_pretrained(parts / "lm")
    for name, tensor in whisper.model.encoder.state_dict().items():
        assert torch.equal(tensor, model.model.audio_encoder.content_encoder.state_dict()[name]), name
    for name, tensor in wavlm.state_dict().items():
        assert torch.equal(tensor, model.model.audio_encoder.paralinguistic_encoder.state_dict()[name]), name
    old_vocab = lm.get_input_embeddings().num_embeddings
    assert torch.equal(lm.model.layers[0].mlp.up_proj.weight, model.model.language_model.layers[0].mlp.up_proj.weight)
    assert torch.equal(lm.get_input_embeddings().weight, model.get_input_embeddings().weight[:old_vocab])
    # the tokenizer gained `<audio>` and the embeddings grew to match
    assert processor.audio_token_id == model.config.audio_token_id >= old_vocab
    assert model.get_input_embeddings().num_embeddings == len(processor.tokenizer)
    assert processor.chat_template


def test_changing_the_audio_changes_the_logits(tiny, batch):
    model, processor = tiny
    other = processor(prompt(processor, 2), [tone(1.3, freq=150.0, amp=0.1), tone(2.1, freq=500.0, amp=0.05)])
    with torch.no_grad():
        a = model(**batch).logits
        b = model(**other).logits
    assert not torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("tower", ["content_states", "paralinguistic_states"])
def test_both_towers_are_live(tiny, batch, tower):
    model, _ = tiny
    mm = model.model.audio_encoder
    with torch.no_grad():
        content = mm.encode_content(batch["input_features"], batch["input_features_mask"].sum(-1))
        para, _ = mm.encode_paralinguistic(batch["input_values"], batch["input_values_mask"])
        states = {"content_states": content, "paralinguistic_states": para}
        reference = model(**batch, **states).logits
        assert torch.equal(reference, model(**batch).logits)  # precomputed states are exactly the live ones
        states[tower] = torch.zeros_like(states[tower])
        zeroed = model(**batch, **states).logits
    assert not torch.allclose(reference, zeroed, atol=1e-4)


def test_content_tower_is_batch_invariant(tiny):
    model, processor = tiny
    short, long_ = tone(0.7), tone(2.9, freq=300)
    together = processor(prompt(processor, 2), [short, long_])
    alone = processor(prompt(processor, 1), [short])
    mm = model.model.audio_encoder
    with torch.no_grad():
        a = mm.encode_content(together["input_features"], together["input_features_mask"].sum(-1))
        b = mm.encode_content(alone["input_features"], alone["input_features_mask"].sum(-1))
    assert torch.allclose(a[0, : b.shape[1]], b[0], atol=1e-5)


def test_token_counts_follow_duration(tiny):
    model, processor = tiny
    seconds = [0.05, 0.5, 1.0, 2.37, 4.0, 7.5]
    counts = [processor.num_audio_tokens(int(s * SR)) for s in seconds]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert counts[seconds.index(4.0)] == 4 * 50 // processor.stack_factor
    for s, expected in zip(seconds, counts):
        enc = processor(prompt(processor), [tone(s)])
        assert int((enc["input_ids"] == processor.audio_token_id).sum()) == expected
        with torch.no_grad():
            _, per_clip = model.model.get_audio_features(
                enc["input_features"], enc["input_features_mask"], enc["input_values"], enc["input_values_mask"]
            )
        assert per_clip == [expected]
    # a 4 s clip costs at most 1/5 of the tokens of the same clip padded to 30 s
    assert processor.num_audio_tokens(4 * SR) <= processor.num_audio_tokens(30 * SR) / 5


def test_placeholder_mismatch_raises_clear_errors(tiny, batch):
    model, processor = tiny
    with pytest.raises(ValueError, match="placeholder"):
        processor(prompt(processor, 1), [tone(1.0), tone(1.0)])
    ids = batch["input_ids"].clone()
    first = (ids[0] == processor.audio_token_id).nonzero()[0, 0]
    ids[0, first : first + 3] = processor.tokenizer.pad_token_id  # drop three placeholders from row 0
    with pytest.raises(AudioPlaceholderError, match="audio"):
        model(**{**batch, "input_ids": ids})


def test_extra_placeholders_beyond_the_clip_are_left_as_text(tiny):
    model, processor = tiny
    enc = processor(prompt(processor), [tone(1.0)])
    ids = torch.cat([enc["input_ids"], torch.tensor([[processor.audio_token_id]])], dim=1)
    mask = torch.cat([enc["attention_mask"], torch.ones(1, 1, dtype=torch.long)], dim=1)
    with torch.no_grad():
        out = model(**{**enc, "input_ids": ids, "attention_mask": mask})
    assert out.logits.shape[1] == ids.shape[1]


def test_generate_with_audio_never_emits_the_audio_token(tiny_model_dir):
    model, processor = load_pretrained(tiny_model_dir)
    model.eval()
    with torch.no_grad():  # make `<audio>` the most likely next token everywhere
        model.lm_head.weight[processor.audio_token_id] = model.lm_head.weight.abs().max() * 50
    enc = processor(prompt(processor, 2), [tone(1.0), tone(1.6, freq=400)], padding_side="left")
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    new = out[:, enc["input_ids"].shape[1] :]
    assert new.shape == (2, 6)
    assert not (new == processor.audio_token_id).any()


def test_lora_trains_language_model_adapters_and_projector_only(tiny_model_dir, tmp_path):
    model, processor = load_pretrained(tiny_model_dir)
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.0)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable
    for name in trainable:
        assert ("language_model" in name and "lora_" in name) or ".projector." in name, name
    assert any("lora_" in n for n in trainable) and any(".projector." in n for n in trainable)
    frozen_towers = [p for n, p in peft_model.named_parameters() if "content_encoder" in n or "paralinguistic_encoder" in n]
    assert frozen_towers and not any(p.requires_grad for p in frozen_towers)

    # one optimisation step moves adapters and projector, nothing else
    enc = processor(prompt(processor), [tone(1.2)])
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    peft_model.train()
    optim = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    loss = peft_model(**enc, labels=enc["input_ids"]).loss
    loss.backward()
    optim.step()
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and changed <= set(trainable)

    # adapters save, load and merge to the same function
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        adapted = peft_model(**enc).logits
    from peft import PeftModel

    base, _ = load_pretrained(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**enc).logits, adapted, atol=1e-5)
        merged = reloaded.merge_and_unload().eval()
        assert torch.allclose(merged(**enc).logits, adapted, atol=1e-4)
    assert isinstance(merged, EmoReasonForConditionalGeneration)


def test_frozen_towers_stay_in_eval_mode_when_training(tiny_model_dir):
    model, _ = load_pretrained(tiny_model_dir)
    model.train()
    audio = model.model.audio_encoder
    assert model.training and model.model.language_model.training and audio.training and audio.projector.training
    assert not audio.content_encoder.training and not audio.paralinguistic_encoder.training


@pytest.mark.parametrize("fusion", ["sum", "gated"])
def test_other_fusions_build_and_run(tiny_model_dir, fusion):
    model, processor = load_pretrained(tiny_model_dir)
    config = model.config.to_dict()
    config["fusion"] = fusion
    other = EmoReasonForConditionalGeneration(EmoReasonConfig(**config)).eval()
    enc = processor(prompt(processor), [tone(1.0)])
    with torch.no_grad():
        assert other(**enc).logits.shape[:2] == enc["input_ids"].shape


def test_config_rejects_bad_settings(tiny_model_dir):
    config = EmoReasonConfig.from_pretrained(tiny_model_dir).to_dict()
    with pytest.raises(ValueError, match="fusion"):
        EmoReasonConfig(**{**config, "fusion": "average"})
    with pytest.raises(ValueError, match="stack_factor"):
        EmoReasonConfig(**{**config, "stack_factor": 0})


def test_paralinguistic_tower_is_batch_invariant(tiny):
    """Group-norm SSL encoders normalise over time: padding must not leak into a clip's states."""
    model, processor = tiny
    assert model.config.paralinguistic_config.feat_extract_norm == "group"
    short, long_ = tone(0.9), tone(2.6, freq=300)
    together = processor(prompt(processor, 2), [short, long_])
    alone = processor(prompt(processor, 1), [short])
    mm = model.model.audio_encoder
    with torch.no_grad():
        a, la = mm.encode_paralinguistic(together["input_values"], together["input_values_mask"])
        b, lb = mm.encode_paralinguistic(alone["input_values"], alone["input_values_mask"])
        n = int(lb[0])
        assert int(la[0]) == n
        assert torch.allclose(a[:, 0, :n], b[:, 0, :n], atol=1e-4)
        batched = model(**together).logits[0, : alone["input_ids"].shape[1]]
        single = model(**alone).logits[0]
    assert torch.allclose(batched, single, atol=1e-4)


def test_generation_with_the_kv_cache_matches_generation_without_it(tiny_model_dir):
    """The cache travels under whatever name the installed transformers gives it (`past_key_values` up to 5.23, `cache`
    from 5.24): if it were dropped or mis-named, cached decoding would see only the newest token and diverge."""
    from emoreason.modeling.modeling_emoreason import CACHE_NAME

    model, processor = load_pretrained(tiny_model_dir)
    model.eval()
    enc = processor(prompt(processor, 2), [tone(1.0), tone(1.6, freq=400)], padding_side="left")
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    cached = model.generate(**enc, use_cache=True, **kwargs)
    uncached = model.generate(**enc, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    with torch.no_grad():
        out = model(**enc, use_cache=True)
    assert getattr(out, CACHE_NAME) is not None and out.audio_hidden_states is not None


def _run_audio_reaches_loss(model_dir, synth_corpus, capsys) -> tuple[int, str]:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "audio_reaches_loss.py"
    spec = importlib.util.spec_from_file_location("audio_reaches_loss", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    status = script.main(["--model", str(model_dir), "--records", str(synth_corpus), "--data_root",
                          str(synth_corpus.parent), "--tasks", "emotion_label", "--rows", "3", "--device", "cpu"])
    return status, capsys.readouterr().out


def test_audio_reaches_loss_script_prints_both_losses_and_fails_when_audio_is_ignored(tiny_model_dir, synth_corpus,
                                                                                      tmp_path, capsys):
    import re

    status, out = _run_audio_reaches_loss(tiny_model_dir, synth_corpus, capsys)
    real = float(re.search(r"loss with the audio\s+([\d.]+)", out).group(1))
    zeroed = float(re.search(r"loss with zeroed audio\s+([\d.]+)", out).group(1))
    assert status == 0 and real > 0 and zeroed > 0 and real != zeroed
    # Control: a projector whose output is always zero makes the clip invisible; the script must say so.
    model, processor = load_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.audio_encoder.projector.linear_2.weight.zero_()
        model.model.audio_encoder.projector.linear_2.bias.zero_()
    model.save_pretrained(tmp_path / "deaf")
    processor.save_pretrained(tmp_path / "deaf")
    status, out = _run_audio_reaches_loss(tmp_path / "deaf", synth_corpus, capsys)
    assert status == 1


# -- host overhead: one read of device values per forward, towers without hooks or per-clip loops ---------------
SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default",
            "aten.masked_select.default", "aten.equal.default"}


def _count_host_reads(fn, monkeypatch):
    """(ops that read a device value back to the host, tolist calls) while ``fn`` runs. On a GPU each is a sync that
    drains the queue of kernels; on a CPU they are counted by name."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func) in SYNC_OPS:
                self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    tolist = torch.Tensor.tolist
    calls = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or tolist(self))
    with Count() as counter:
        result = fn()
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return result, sum(counter.ops.values()), len(calls)


def test_forward_reads_device_values_once_and_backward_never(tiny, monkeypatch):
    """Lengths for slicing and the placeholder check are read in ONE tolist before the towers run; the towers, the
    fusion and the placeholder scatter read nothing back (was: 5 scalar reads + a nonzero per clip). The language
    model's own mask code reads what it reads alone (the floor)."""
    model, processor = tiny
    enc = processor(prompt(processor, 3), [tone(0.7), tone(1.9, freq=300), tone(1.2, freq=180)])
    model.train()
    try:
        out, reads, tolists = _count_host_reads(lambda: model(**enc, labels=enc["input_ids"]), monkeypatch)
        embeds = model.get_input_embeddings()(enc["input_ids"])
        _, lm_reads, _ = _count_host_reads(
            lambda: model.model.language_model(inputs_embeds=embeds, attention_mask=enc["attention_mask"]),
            monkeypatch)
        _, backward_reads, backward_tolists = _count_host_reads(lambda: out.loss.backward(), monkeypatch)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    assert tolists == 1
    assert reads == lm_reads
    assert backward_reads == 0 and backward_tolists == 0


@pytest.mark.parametrize("family", ["wavlm-base", "wavlm-large", "hubert-large", "wav2vec2-base"])
def test_ssl_encoder_driven_layer_by_layer_matches_the_library(family):
    """Our layer-by-layer run of the SSL transformer (no hooks, no boolean-index sync) gives the library's states:
    its hidden_states for every layer input, and its last_hidden_state (after a pre-norm model's final norm)."""
    from transformers import HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2Model, WavLMConfig, WavLMModel

    from emoreason.modeling.audio_encoder import _run_ssl_encoder

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                  conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                  layerdrop=0.0, mask_time_prob=0.0)
    large = dict(feat_extract_norm="layer", do_stable_layer_norm=True)
    base = dict(feat_extract_norm="group", do_stable_layer_norm=False)
    model = {"wavlm-base": lambda: WavLMModel(WavLMConfig(**common, **base, num_buckets=32, max_bucket_distance=64)),
             "wavlm-large": lambda: WavLMModel(WavLMConfig(**common, **large, num_buckets=32, max_bucket_distance=64)),
             "hubert-large": lambda: HubertModel(HubertConfig(**common, **large)),
             "wav2vec2-base": lambda: Wav2Vec2Model(Wav2Vec2Config(**common, **base))}[family]().eval()
    values = torch.randn(2, 8000)
    mask = torch.ones(2, 8000, dtype=torch.long)
    mask[1, 5000:] = 0
    with torch.no_grad():
        extract = model.feature_extractor(values).transpose(1, 2)
        lengths = model._get_feat_extract_output_lengths(mask.sum(-1))
        frame_mask = torch.arange(extract.shape[1])[None, :] < lengths[:, None]
        projected = model.feature_projection(extract)
        hidden = projected[0] if isinstance(projected, tuple) else projected
        reference = model(values, attention_mask=mask, output_hidden_states=True)
        states = _run_ssl_encoder(model.encoder, hidden.clone(), frame_mask, all_layers=True)
        last = _run_ssl_encoder(model.encoder, hidden.clone(), frame_mask, all_layers=False)
    keep = frame_mask[None, :, :, None]
    assert states.shape[0] == len(reference.hidden_states) == common["num_hidden_layers"] + 1
    for i, ref in enumerate(reference.hidden_states):  # the first layer's input, then every layer's output
        assert torch.allclose(states[i] * keep[0], ref * keep[0], atol=1e-5), i
    assert torch.allclose(last * keep[0], reference.last_hidden_state * keep[0], atol=1e-5)


def test_group_norm_feature_encoder_batched_equals_per_clip(tiny):
    from emoreason.modeling.audio_encoder import _masked_group_norm_features

    model, _ = tiny
    extractor = model.model.audio_encoder.paralinguistic_encoder.feature_extractor
    clips = [torch.randn(n) for n in (1600, 5231, 9000)]
    values = torch.zeros(3, 9000)
    for i, c in enumerate(clips):
        values[i, : c.shape[0]] = c
    with torch.no_grad():
        batched = _masked_group_norm_features(extractor, values, torch.tensor([c.shape[0] for c in clips]))
        for i, c in enumerate(clips):
            alone = extractor(c[None])
            assert torch.allclose(batched[i, :, : alone.shape[-1]], alone[0], atol=1e-5), i
