"""EmoReason for vLLM: processing info, dummy inputs, multimodal processor and the model.

Imported by vLLM only (through the lazy registration in :mod:`emoreason.serve.vllm_plugin`), in vLLM's own
environment: it uses nothing but vLLM, torch, transformers and our dependency-free modeling code.

Split of work:
- The **language model** is vLLM's own implementation of the LLM family in ``config.text_config`` (Qwen2, Llama,
  ...), built with ``init_vllm_registered_model``: paged attention, tensor parallelism, CUDA graphs and LoRA come
  from vLLM unchanged.
- The **audio side** (Whisper encoder, WavLM/HuBERT/wav2vec2 encoder, projector) is the training code itself:
  :class:`~emoreason.modeling.audio_encoder.EmoReasonAudioEncoder`, the module the training model holds as
  ``model.audio_encoder``, so duration-proportional encoding, layer mixing, frame alignment and fusion cannot drift
  from training. It is replicated on every tensor-parallel rank (it is small next to the LLM).
- The **processor** computes features with our own :class:`~emoreason.modeling.EmoReasonProcessor` one clip at a time
  (a clip's features never depend on what it is batched with); the encoders then run once per scheduled batch of
  clips, padded and masked as in training and expands each ``<audio>`` to
  :func:`~emoreason.data.audio_tokens.num_audio_tokens` of the clip's length: the count the model produces.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.model_executor.models.interfaces import (
    MultiModalEmbeddings,
    SupportsLoRA,
    SupportsMultiModal,
    SupportsPP,
)
from vllm.model_executor.models.module_mapping import MultiModelKeys
from vllm.model_executor.models.utils import WeightsMapper, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.sequence import IntermediateTensors

from emoreason.data.audio import AudioError
from emoreason.data.audio_tokens import SAMPLE_RATE, max_samples_for, num_audio_tokens
from emoreason.modeling.audio_encoder import LEGACY_CHECKPOINT_KEYS, EmoReasonAudioEncoder
from emoreason.modeling.configuration_emoreason import EmoReasonConfig
from emoreason.modeling.processing_emoreason import AUDIO_TOKEN, EmoReasonProcessor

AUDIO_FIELDS = ("input_features", "input_values")


class UnmergedAdapterError(ValueError):
    """A checkpoint still holds LoRA factors: serve it with --lora or merge it first."""


# -- processing ---------------------------------------------------------------------------------------------------
class EmoReasonProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> EmoReasonConfig:
        return self.ctx.get_hf_config(EmoReasonConfig)

    def get_hf_processor(self, **kwargs: object) -> EmoReasonProcessor:
        return self.ctx.get_hf_processor(EmoReasonProcessor, **kwargs)

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        # Our processor takes no per-request options: features depend on the audio alone.
        return {"text_kwargs": set(), "audio_kwargs": set()}

    def get_data_parser(self) -> MultiModalDataParser:
        # vLLM decodes, resamples to 16 kHz and downmixes to mono before our processor sees the clip; polyphase
        # resampling (scipy) is what emoreason.data.audio uses, so served clips equal the ones trained on.
        return MultiModalDataParser(
            target_sr=SAMPLE_RATE,
            target_channels=1,
            audio_resample_method="scipy",
            expected_hidden_size=self._get_expected_hidden_size(),
            allow_missing_mm_embeddings=self.allow_missing_mm_embeddings,
        )

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"audio": None}

    @property
    def max_source_positions(self) -> int:
        return self.get_hf_config().content_config.max_source_positions

    @property
    def max_audio_samples(self) -> int:
        """Longest clip served (Whisper: 30 s); a longer one is refused with a 400, as the built-in server does."""
        return max_samples_for(self.max_source_positions)

    def num_audio_tokens(self, num_samples: int) -> int:
        return num_audio_tokens(num_samples, self.get_hf_config().stack_factor, self.max_source_positions)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"audio": self.num_audio_tokens(self.max_audio_samples)}


class EmoReasonDummyInputsBuilder(BaseDummyInputsBuilder[EmoReasonProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return AUDIO_TOKEN * mm_counts.get("audio", 0)

    def get_dummy_mm_data(
        self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions
    ) -> dict:
        # Memory is profiled at the longest clip the encoders take.
        return {
            "audio": self._get_dummy_audios(
                length=self.info.max_audio_samples,
                num_audios=mm_counts.get("audio", 0),
                overrides=mm_options.get("audio") if mm_options else None,
            )
        }


class EmoReasonMultiModalProcessor(BaseMultiModalProcessor[EmoReasonProcessingInfo]):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        processor = self.info.get_hf_processor()
        # A clip longer than the encoder window would be heard only in part: refused (vLLM answers a ValueError with
        # a 400), as the built-in server refuses it, rather than cut without a word.
        limit = self.info.max_audio_samples
        for index, audio in enumerate(hf_data.get("audio", [])):
            if len(audio) > limit:
                raise AudioError(f"audio {index}", f"the clip is {len(audio) / SAMPLE_RATE:.2f} s long; this model "
                                 f"hears at most {limit / SAMPLE_RATE:g} s (its content encoder's window)")
        # processor.load: the clip as training saw it (padded to the minimum length, and refused with a reason if it
        # holds NaN/inf or nothing at all).
        clips = [processor.load(np.asarray(audio, dtype=np.float32), SAMPLE_RATE) for audio in hf_data.get("audio", [])]
        per_clip = [processor.audio_features([clip]) for clip in clips]
        # Lists of unpadded per-clip tensors (vLLM's batched fields accept ragged lists).
        return BatchFeature({key: [features[key][0] for features in per_clip] for key in AUDIO_FIELDS})

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {key: MultiModalFieldConfig.batched("audio") for key in AUDIO_FIELDS}

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        audio_token_id = self.info.get_hf_config().audio_token_id
        data = out_mm_kwargs.get_data()
        values = data.get("input_values", [])

        def replacement(item_idx: int) -> list[int]:
            # input_values holds the clip as the model sees it (cut and padded), so its length is the truth.
            return [audio_token_id] * self.info.num_audio_tokens(int(values[item_idx].shape[-1]))

        return [PromptReplacement(modality="audio", target=[audio_token_id], replacement=replacement)]


# -- model --------------------------------------------------------------------------------------------------------
class ServingAudioEncoder(EmoReasonAudioEncoder):
    """The training model's audio encoder, inference only: no gradients, and never in training mode (no dropout,
    LayerDrop or SpecAugment), whatever the checkpoint's ``train_*_encoder`` flags say."""

    def __init__(self, config: EmoReasonConfig):
        super().__init__(config)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def loadable_state(self) -> dict[str, torch.Tensor]:
        """Every tensor a checkpoint fills here: the parameters and the persistent buffers (the projector's measured
        feature-normalisation statistics travel in checkpoints like weights)."""
        return self.state_dict(keep_vars=True)


def _as_clip_list(value) -> list[torch.Tensor]:
    """vLLM hands a batched field over stacked (all clips the same length) or as a list (ragged)."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return list(value.unbind(0))
    return list(value)


def checkpoint_key_mapper() -> WeightsMapper:
    """Our checkpoint's names -> this module's names (also applied by vLLM to LoRA adapter module names).

    Checkpoints written before the audio path moved under ``model.audio_encoder`` (``model.projector.*``, ...) are
    renamed first, by the same rule ``from_pretrained`` applies (``LEGACY_CHECKPOINT_KEYS``)."""
    return WeightsMapper(
        orig_to_new_regex={
            # PEFT wrappers left in a full-model export (``save_pretrained`` of a merged PeftModel).
            re.compile(r"^base_model\.model\."): "",
            re.compile(r"\.base_layer\."): ".",
            **{re.compile(old): new for old, new in LEGACY_CHECKPOINT_KEYS.items()},
        },
        orig_to_new_prefix={
            "model.language_model.": "language_model.model.",
            "lm_head.": "language_model.lm_head.",
            "model.audio_encoder.": "audio_encoder.",
        },
    )


@MULTIMODAL_REGISTRY.register_processor(
    EmoReasonMultiModalProcessor, info=EmoReasonProcessingInfo, dummy_inputs=EmoReasonDummyInputsBuilder
)
class EmoReasonForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsPP, SupportsLoRA):
    hf_to_vllm_mapper = checkpoint_key_mapper()
    # LoRA adapters target the language model only (emoreason.modeling.lora); vLLM fuses these projections.
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("audio"):
            return AUDIO_TOKEN
        raise ValueError(f"EmoReason takes audio and text, not {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: EmoReasonConfig = vllm_config.model_config.hf_config
        self.config = config
        self.configure_mm_token_handling(config.text_config.vocab_size, [config.audio_token_id])
        with self._mark_tower_model(vllm_config, "audio"):
            self.audio_encoder = ServingAudioEncoder(config)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=_causal_lm_architectures(config.text_config),
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def get_mm_mapping(self) -> MultiModelKeys:
        return MultiModelKeys.from_string_field(
            language_model="language_model.", connector="audio_encoder.projector.", tower_model="audio_encoder."
        )

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        features = _as_clip_list(kwargs.get("input_features"))
        values = _as_clip_list(kwargs.get("input_values"))
        if not features:
            return []
        if len(features) != len(values):
            raise ValueError(f"{len(features)} mel inputs but {len(values)} waveforms")
        with torch.inference_mode():
            return tuple(self.audio_encoder.embed_clips(features, values))

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        audio_params = self.audio_encoder.loadable_state()
        loaded: set[str] = set()

        def language_model_weights():
            for name, tensor in self.hf_to_vllm_mapper.apply(weights):
                if ".lora_A." in name or ".lora_B." in name or ".lora_embedding_" in name:
                    raise UnmergedAdapterError(
                        f"checkpoint tensor {name} is an unmerged LoRA factor: export a merged checkpoint "
                        "(emoreason export) or serve the adapter with --lora NAME=ADAPTER_DIR"
                    )
                if name.startswith("audio_encoder."):
                    local = name.removeprefix("audio_encoder.")
                    if local not in audio_params:
                        raise KeyError(f"checkpoint tensor {name} has no parameter in the audio encoder")
                    target = audio_params[local]
                    if target.shape != tensor.shape:
                        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(target.shape)}")
                    with torch.no_grad():
                        target.copy_(tensor.to(target.dtype))
                    loaded.add(name)
                elif name.startswith("language_model."):
                    yield name.removeprefix("language_model."), tensor
                else:
                    raise KeyError(f"checkpoint tensor {name} belongs to no part of the model")

        loaded |= {f"language_model.{n}" for n in self.language_model.load_weights(language_model_weights())}
        return loaded


def _causal_lm_architectures(text_config) -> list[str]:
    if getattr(text_config, "architectures", None):
        return list(text_config.architectures)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[text_config.model_type]]


__all__ = [
    "EmoReasonDummyInputsBuilder",
    "EmoReasonForConditionalGeneration",
    "EmoReasonMultiModalProcessor",
    "EmoReasonProcessingInfo",
    "ServingAudioEncoder",
    "UnmergedAdapterError",
    "checkpoint_key_mapper",
]
