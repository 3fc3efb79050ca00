"""The vLLM model, built on CPU: every checkpoint tensor has a home, and the audio path equals the training model's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import needs_vllm

pytestmark = needs_vllm

# vLLM fuses these projections; a checkpoint tensor named like the key lands in the shard of the value.
PACKED = {".q_proj.": ".qkv_proj.", ".k_proj.": ".qkv_proj.", ".v_proj.": ".qkv_proj.",
          ".gate_proj.": ".gate_up_proj.", ".up_proj.": ".gate_up_proj."}


def vllm_name(checkpoint_name: str, mapper) -> str:
    name = mapper.map_name(checkpoint_name)
    if name.startswith("language_model."):
        for original, packed in PACKED.items():
            name = name.replace(original, packed)
    return name


def loadable_tensors(model) -> dict:
    """What a checkpoint fills: every parameter, and the audio side's buffers (its normalisation statistics)."""
    tensors = dict(model.named_parameters())
    tensors.update({f"audio_encoder.{name}": t for name, t in model.audio_encoder.loadable_state().items()})
    return tensors


def test_every_checkpoint_tensor_maps_to_a_parameter_and_none_is_left_over(vllm_model, checkpoint_tensors):
    model, _ = vllm_model
    params = loadable_tensors(model)
    mapped = {name: vllm_name(name, model.hf_to_vllm_mapper) for name in checkpoint_tensors}
    homeless = sorted(name for name, target in mapped.items() if target not in params)
    assert homeless == []
    unfilled = sorted(set(params) - set(mapped.values()))
    assert unfilled == []
    # The audio side is the training model's module tree, shape for shape.
    for name, target in mapped.items():
        if target.startswith("audio_encoder."):
            assert params[target].shape == checkpoint_tensors[name].shape, name


def test_load_weights_fills_every_parameter_with_the_checkpoint(loaded_vllm_model, checkpoint_tensors):
    model, loaded = loaded_vllm_model
    params = loadable_tensors(model)
    assert loaded == set(params)
    # The measured normalisation statistics arrive too (the tiny checkpoint carries non-trivial ones).
    assert int(params["audio_encoder.projector.feature_norm_frames"]) > 0
    torch.testing.assert_close(params["audio_encoder.projector.content_std"],
                               checkpoint_tensors["model.audio_encoder.projector.content_std"])
    torch.testing.assert_close(params["audio_encoder.projector.linear_1.weight"],
                               checkpoint_tensors["model.audio_encoder.projector.linear_1.weight"])
    lm_head = checkpoint_tensors["lm_head.weight"]  # vLLM pads the vocabulary to a multiple of 64
    torch.testing.assert_close(params["language_model.lm_head.weight"][: lm_head.shape[0]], lm_head)
    qkv = params["language_model.model.layers.0.self_attn.qkv_proj.weight"]
    q, k, v = (checkpoint_tensors[f"model.language_model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    torch.testing.assert_close(qkv, torch.cat([q, k, v]))


def test_merged_peft_export_names_and_unmerged_adapters(vllm_model, checkpoint_tensors):
    from vllm.config import set_current_vllm_config

    from emoreason.serve.vllm_model import UnmergedAdapterError

    model, vllm_config = vllm_model
    mapper = model.hf_to_vllm_mapper
    # A PeftModel saved whole keeps its wrappers in the names; they map to the same parameters.
    assert mapper.map_name("base_model.model.model.language_model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "language_model.model.layers.0.self_attn.q_proj.weight"
    for name in ("base_model.model.model.audio_encoder.projector.linear_2.bias",
                 "base_model.model.model.projector.linear_2.bias"):  # the layout before model.audio_encoder
        assert mapper.map_name(name) == "audio_encoder.projector.linear_2.bias"
    lora = {"model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight": torch.zeros(8, 64)}
    with set_current_vllm_config(vllm_config), pytest.raises(UnmergedAdapterError, match="emoreason export"):
        model.load_weights(lora.items())
    with set_current_vllm_config(vllm_config), pytest.raises(KeyError, match="no parameter"):
        model.load_weights({"model.projector.not_a_layer.weight": torch.zeros(1)}.items())


def test_a_checkpoint_with_the_earlier_audio_names_loads_the_same_tensors(vllm_model, loaded_vllm_model,
                                                                         checkpoint_tensors):
    """Checkpoints saved before the audio path moved under ``model.audio_encoder`` (``model.projector.*``, ...) fill
    the same parameters with the same values."""
    from vllm.config import set_current_vllm_config

    model, vllm_config = vllm_model
    params = loadable_tensors(model)
    before = {name: params[name].detach().clone() for name in params if name.startswith("audio_encoder.")}
    old = {name.replace("model.audio_encoder.", "model.", 1): tensor for name, tensor in checkpoint_tensors.items()
           if name.startswith("model.audio_encoder.")}
    assert old and all(name.startswith(("model.content_encoder.", "model.paralinguistic_encoder.",
                                        "model.projector.")) for name in old)
    with set_current_vllm_config(vllm_config):
        reloaded = model.load_weights(old.items())
    assert reloaded == set(before)
    for name, value in before.items():
        assert torch.equal(params[name], value), name


def test_the_vllm_audio_side_is_the_training_audio_encoder(vllm_model):
    from emoreason.modeling.audio_encoder import EmoReasonAudioEncoder

    model, _ = vllm_model
    assert isinstance(model.audio_encoder, EmoReasonAudioEncoder)
    assert not model.audio_encoder.training and not any(p.requires_grad for p in model.audio_encoder.parameters())


def test_audio_embeddings_equal_the_training_model(loaded_vllm_model, mm_processor, hf_model_and_processor):
    """Clips of different lengths, batched by vLLM: each clip's embeddings equal what our model computes for it."""
    model, _ = loaded_vllm_model
    hf_model, processor = hf_model_and_processor
    rng = np.random.default_rng(7)
    clips = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (16_000, 41_000, 3_000)]
    ids = mm_processor.info.get_tokenizer().encode("<audio>" * len(clips), add_special_tokens=False)
    out = mm_processor(ids, mm_processor.info.parse_mm_data({"audio": [(c, 16_000) for c in clips]}))
    embeds = model.embed_multimodal(**out["mm_kwargs"].get_data())
    assert [e.shape[0] for e in embeds] == [r.length for r in out["mm_placeholders"]["audio"]]
    for wav, embedding in zip(clips, embeds):
        with torch.no_grad():
            reference, tokens = hf_model.model.get_audio_features(**processor.audio_features([processor.load(wav)]))
        assert embedding.shape[0] == int(tokens[0])
        torch.testing.assert_close(embedding, reference[0, : int(tokens[0])], rtol=1e-4, atol=1e-5)


def test_prompt_embeddings_equal_the_training_merge(loaded_vllm_model, mm_processor, hf_model_and_processor):
    """Text embeddings with the clip's embeddings written over its `<audio>` tokens, as our model's merge_audio does."""
    model, _ = loaded_vllm_model
    hf_model, processor = hf_model_and_processor
    wav = (0.1 * np.random.default_rng(8).standard_normal(24_000)).astype(np.float32)
    prompt = "<|im_start|>user\n<audio>\nWhy?<|im_end|>"
    ids = mm_processor.info.get_tokenizer().encode(prompt, add_special_tokens=False)
    out = mm_processor(ids, mm_processor.info.parse_mm_data({"audio": [(wav, 16_000)]}))
    input_ids = torch.tensor(out["prompt_token_ids"])
    is_audio = input_ids == model.config.audio_token_id
    embeds = model.embed_input_ids(input_ids, model.embed_multimodal(**out["mm_kwargs"].get_data()),
                                   is_multimodal=is_audio)
    batch = processor(text=prompt, audio=wav)
    assert batch["input_ids"][0].tolist() == input_ids.tolist()
    with torch.no_grad():
        audio, tokens = hf_model.model.get_audio_features(batch["input_features"], batch["input_features_mask"],
                                                          batch["input_values"], batch["input_values_mask"])
        text = hf_model.get_input_embeddings()(batch["input_ids"])
        reference = hf_model.model.merge_audio(batch["input_ids"], text, audio, tokens)[0]
    torch.testing.assert_close(embeds, reference, rtol=1e-4, atol=1e-5)


def test_lora_adapter_names_land_on_language_model_layers(vllm_model, tmp_path):
    """An adapter as emoreason.modeling.lora makes it (its default targets, all under model.language_model) in the
    format PEFT saves it (peft is not in vLLM's environment, so the files are written here), loads through vLLM's
    LoRA loader onto the vLLM language model's (fused) projections."""
    import json

    from safetensors.torch import save_file
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import get_supported_lora_modules

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # lora.DEFAULT_TARGETS

    model, vllm_config = vllm_model
    text = vllm_config.model_config.hf_config.text_config
    kv = text.num_key_value_heads * text.hidden_size // text.num_attention_heads
    shapes = {"self_attn.q_proj": (text.hidden_size, text.hidden_size), "self_attn.k_proj": (kv, text.hidden_size),
              "self_attn.v_proj": (kv, text.hidden_size), "self_attn.o_proj": (text.hidden_size, text.hidden_size),
              "mlp.gate_proj": (text.intermediate_size, text.hidden_size),
              "mlp.up_proj": (text.intermediate_size, text.hidden_size),
              "mlp.down_proj": (text.hidden_size, text.intermediate_size)}
    rank, tensors = 4, {}
    for layer in range(text.num_hidden_layers):
        for module, (out_features, in_features) in shapes.items():
            key = f"base_model.model.model.language_model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features)
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, rank)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
        "target_modules": r"model\.language_model\..*\.(" + "|".join(targets) + ")", "modules_to_save": None}))

    expected = {name for module in get_supported_lora_modules(model)
                for name in model.packed_modules_mapping.get(module, [module])}
    assert set(targets) <= expected
    lora = LoRAModel.from_local_checkpoint(
        str(tmp_path), expected, PEFTHelper.from_local_dir(str(tmp_path), text.max_position_embeddings),
        device="cpu", weights_mapper=model.hf_to_vllm_mapper.get_rename_mapper())
    assert len(lora.loras) == text.num_hidden_layers * len(shapes)
    modules = dict(model.named_modules())
    fused = {name: packed for packed, names in model.packed_modules_mapping.items() for name in names}
    for name in lora.loras:
        parent, leaf = name.rsplit(".", 1)
        assert parent.startswith("language_model.model.layers.") and f"{parent}.{fused.get(leaf, leaf)}" in modules


def _clips(lengths, seed):
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


def _features(processor, clips):
    """Per-clip unpadded features, as vLLM's processor hands them to the model."""
    per_clip = [processor.audio_features([processor.load(wav)]) for wav in clips]
    return [f["input_features"][0] for f in per_clip], [f["input_values"][0] for f in per_clip]


@pytest.mark.parametrize("feat_extract_norm", ["group", "layer"])
def test_a_batch_of_clips_is_encoded_in_one_call_with_training_parity(hf_model_and_processor, feat_extract_norm,
                                                                      monkeypatch):
    """The clips vLLM schedules together go through the training model's audio encoder ONCE (padded, masked);
    each clip's embeddings equal what the training model computes for it alone and in a training batch. Both kinds
    of SSL feature encoder: group norm (wavlm-base: normalised over time, the padding must not leak in) and layer
    norm (wavlm-large / hubert-large: batched as is)."""
    import copy

    from emoreason.modeling.modeling_emoreason import EmoReasonModel
    from emoreason.modeling.audio_encoder import EmoReasonAudioEncoder
    from emoreason.serve.vllm_model import ServingAudioEncoder

    hf_model, processor = hf_model_and_processor
    config = copy.deepcopy(hf_model.config)
    config.paralinguistic_config.feat_extract_norm = feat_extract_norm
    config.paralinguistic_config.do_stable_layer_norm = feat_extract_norm == "layer"
    torch.manual_seed(3)
    reference = EmoReasonModel(config).eval()
    if feat_extract_norm == "group":  # the checkpoint's own towers
        reference.load_state_dict(hf_model.model.state_dict())
    encoder = ServingAudioEncoder(config)
    missing, unexpected = encoder.load_state_dict(reference.audio_encoder.state_dict(), strict=True)
    assert not missing and not unexpected

    calls = []
    original = EmoReasonAudioEncoder.forward
    monkeypatch.setattr(EmoReasonAudioEncoder, "forward",
                        lambda self, *a, **k: (self is encoder and calls.append(a[0].shape)) or original(self, *a, **k))
    clips = _clips((16_000, 41_000, 3_000, 24_000), seed=11)
    features, values = _features(processor, clips)
    with torch.no_grad():
        embeds = encoder.embed_clips(features, values)
        batch = reference.get_audio_features(**processor.audio_features([processor.load(w) for w in clips]))
    assert len(calls) == 1 and calls[0][0] == len(clips)  # one encoder call for the whole batch
    for i, (wav, embedding) in enumerate(zip(clips, embeds)):
        with torch.no_grad():
            alone, tokens = reference.get_audio_features(**processor.audio_features([processor.load(wav)]))
        assert embedding.shape[0] == int(tokens[0]) == int(batch[1][i])
        torch.testing.assert_close(embedding, alone[0, : int(tokens[0])], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(embedding, batch[0][i, : int(tokens[0])], rtol=1e-4, atol=1e-5)
    # Control: the batch is not trivially equal to its parts (the clips differ, so must their embeddings).
    assert not torch.allclose(embeds[0][:5], embeds[3][:5])
