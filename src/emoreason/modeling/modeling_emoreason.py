"""EmoReason: a dual-encoder audio LLM in the LLaVA / Qwen2-Audio layout.

``EmoReasonModel`` holds ``audio_encoder`` (:class:`~.audio_encoder.EmoReasonAudioEncoder`: the content encoder, the
paralinguistic encoder and the projector, i.e. the whole audio path) and ``language_model``, and writes each clip's
embeddings over its `<audio>` placeholders. ``EmoReasonForConditionalGeneration`` is ``model`` + ``lm_head``, so TRL
trainers (``model.base_model`` + ``get_output_embeddings()``) and ``generate`` work unchanged.

Weights are named ``model.audio_encoder.{content_encoder,paralinguistic_encoder,projector}.*``,
``model.language_model.*`` and ``lm_head.*``; checkpoints and adapters written with the earlier names
(``model.projector.*``, ...) load through :data:`~.audio_encoder.LEGACY_CHECKPOINT_KEYS`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, GenerationMixin, PreTrainedModel
from transformers.generation import LogitsProcessorList, SuppressTokensLogitsProcessor
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils import logging as hf_logging

from .audio_encoder import (
    LEGACY_CHECKPOINT_KEYS,
    EmoReasonAudioEncoder,
    build_projector,
    clip_lengths,
    init_audio_weights,
    read_host_lengths,
)
from .configuration_emoreason import EmoReasonConfig
from .loading import attn_implementation_per_part, safe_load_kwargs


class AudioPlaceholderError(ValueError):
    """The `<audio>` placeholders in the text do not match the audio given."""


def _cache_name() -> str:
    """What the installed transformers calls the KV cache in outputs and forward arguments: ``past_key_values`` up to
    5.23, ``cache`` from 5.24 (its shims turn ``past_key_values=`` into an unknown ``cache=`` for our outputs)."""
    fields = {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
    return "cache" if "cache" in fields else "past_key_values"


CACHE_NAME = _cache_name()


def _take_cache(past_key_values, kwargs: dict):
    """The cache from either name (generate passes ``cache=`` from 5.24, callers may still say ``past_key_values``)."""
    cache = kwargs.pop("cache", None)
    if past_key_values is not None and cache is not None:
        raise ValueError("pass the KV cache once: both past_key_values and cache were given")
    return cache if cache is not None else past_key_values


# The library's own output classes carry the cache field under the installed version's name; ours only add the clip.
@dataclass
class EmoReasonModelOutputWithPast(BaseModelOutputWithPast):
    audio_hidden_states: torch.FloatTensor | None = None


@dataclass
class EmoReasonCausalLMOutputWithPast(CausalLMOutputWithPast):
    audio_hidden_states: torch.FloatTensor | None = None


class EmoReasonPreTrainedModel(PreTrainedModel):
    config: EmoReasonConfig
    config_class = EmoReasonConfig
    base_model_prefix = "model"
    input_modalities = ("audio", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = [CACHE_NAME]
    _no_split_modules = ["WhisperEncoderLayer", "WavLMEncoderLayer", "HubertEncoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    # Read by PEFT when it loads an adapter (keys of an adapter saved before ``model.audio_encoder`` existed).
    _checkpoint_conversion_mapping = LEGACY_CHECKPOINT_KEYS

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``attn_implementation="sdpa"`` (one name, as recipes give it) is applied to each part that has that kernel,
        and eager attention to the others (WavLM), as at assembly; see :func:`~.loading.attn_implementation_per_part`.

        Checkpoints with the earlier weight names load through transformers' ``key_mapping``
        (:data:`~.audio_encoder.LEGACY_CHECKPOINT_KEYS`); as with any renaming the library applies at load, re-saving
        such a model keeps the names its checkpoint had. Loading materialises fresh parameters, so the towers' freezing
        (per config) is applied again afterwards."""
        kwargs["key_mapping"] = {**LEGACY_CHECKPOINT_KEYS, **(kwargs.get("key_mapping") or {})}
        requested = kwargs.get("attn_implementation")
        if isinstance(requested, str):
            config = kwargs.get("config")
            if not isinstance(config, EmoReasonConfig):
                config = EmoReasonConfig.from_pretrained(pretrained_model_name_or_path)
            kwargs["attn_implementation"] = attn_implementation_per_part(
                {name: getattr(config, name) for name in config.sub_configs}, requested)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).get_audio_encoder().apply_freezing()
        return loaded

    def _init_weights(self, module):
        std = getattr(self.config.get_text_config(), "initializer_range", 0.02)
        if init_audio_weights(module, std):
            return
        if isinstance(module, nn.Linear) and module is getattr(self, "lm_head", None):
            nn.init.normal_(module.weight, mean=0.0, std=std)


class EmoReasonModel(EmoReasonPreTrainedModel):
    def __init__(self, config: EmoReasonConfig):
        super().__init__(config)
        self.audio_encoder = EmoReasonAudioEncoder(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_audio_encoder(self) -> EmoReasonAudioEncoder:
        return self.audio_encoder

    def get_audio_features(self, *args, **kwargs) -> tuple[torch.Tensor, list[int]]:
        """(audio embeddings (clips, max_tokens, D_lm), tokens per clip): :meth:`EmoReasonAudioEncoder.forward`."""
        return self.audio_encoder(*args, **kwargs)

    def merge_audio(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, audio_embeds: torch.Tensor, tokens_per_clip,
        placeholders_per_row: list[int] | None = None,
    ) -> torch.Tensor:
        """Write each clip's embeddings over the `<audio>` placeholders of its row.

        One clip per row when the batch has as many clips as rows (the usual case); otherwise clips fill rows in
        order (a packed row holds several clips, each over its own example's placeholders). A row's placeholders
        beyond its clips' tokens (e.g. a sampled `<audio>` token) are left as text.

        One gather and one select over the whole batch, no per-clip loop and no read of device values (given
        ``tokens_per_clip`` as a host list and ``placeholders_per_row``; else they are read here).
        """
        placeholder = input_ids == self.config.audio_token_id
        counts = tokens_per_clip if isinstance(tokens_per_clip, list) else tokens_per_clip.tolist()
        available = placeholders_per_row if placeholders_per_row is not None else placeholder.sum(-1).tolist()
        num_rows, num_clips = input_ids.shape[0], len(counts)
        row_of_clip: list[int] = []
        if num_clips == num_rows:
            row_of_clip = list(range(num_rows))
        else:
            row, used = 0, 0
            for n in counts:
                while row < num_rows and available[row] - used < n:
                    row, used = row + 1, 0
                if row == num_rows:
                    break
                row_of_clip.append(row)
                used += n
        if len(row_of_clip) < num_clips:
            raise AudioPlaceholderError(
                f"{num_clips} audio clips need {counts} `<audio>` tokens, but the rows hold "
                f"{available}; format prompts with the processor, which expands each `<audio>`"
            )
        filled = [0] * num_rows
        for clip, (row, n) in enumerate(zip(row_of_clip, counts)):
            if available[row] - filled[row] < n:
                raise AudioPlaceholderError(
                    f"row {row} has {available[row] - filled[row]} free `<audio>` tokens but clip {clip} needs {n}; "
                    "format prompts with the processor, which expands each `<audio>` to the clip's length"
                )
            filled[row] += n
        # Clips fill their row's placeholders from the first, in clip order, and rows in order: the k-th filled
        # placeholder of the batch (row-major) takes the k-th token of the clips' tokens laid end to end.
        device = inputs_embeds.device
        width = audio_embeds.shape[1]
        token_index = torch.tensor([c * width + t for c, n in enumerate(counts) for t in range(n)] or [0],
                                   dtype=torch.long).to(device, non_blocking=True)
        flat = audio_embeds.to(inputs_embeds.dtype).reshape(-1, audio_embeds.shape[-1]).index_select(0, token_index)
        before = [0] * num_rows
        for row in range(1, num_rows):
            before[row] = before[row - 1] + filled[row - 1]
        row_meta = torch.tensor([filled, before], dtype=torch.long).to(device, non_blocking=True)
        rank = placeholder.long().cumsum(-1) - 1  # each placeholder's index among its row's placeholders
        selected = placeholder & (rank < row_meta[0][:, None])
        source = (rank + row_meta[1][:, None]).clamp(0, flat.shape[0] - 1)
        merged_audio = flat.index_select(0, source.reshape(-1)).reshape(*input_ids.shape, flat.shape[-1])
        return torch.where(selected.unsqueeze(-1), merged_audio, inputs_embeds)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        input_values: torch.FloatTensor | None = None,
        input_values_mask: torch.Tensor | None = None,
        content_states: torch.FloatTensor | None = None,
        paralinguistic_states: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> EmoReasonModelOutputWithPast:
        cache = _take_cache(past_key_values, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        audio_embeds = None
        if input_features is not None or content_states is not None:
            if input_ids is None:
                raise ValueError("audio inputs need input_ids to locate the `<audio>` placeholders")
            if input_features_mask is None:
                input_features_mask = torch.ones(
                    input_features.shape[0], input_features.shape[-1], dtype=torch.long, device=input_features.device
                )
            mel_lengths, sample_lengths = clip_lengths(input_features_mask, input_values, input_values_mask)
            # every length the step needs on the host, read once before the towers' kernels are queued
            host_mel, host_samples, placeholders = read_host_lengths(
                mel_lengths, sample_lengths, (input_ids == self.config.audio_token_id).sum(-1))
            audio_embeds, tokens_per_clip = self.audio_encoder(
                input_features, input_features_mask, input_values, input_values_mask,
                content_states=content_states, paralinguistic_states=paralinguistic_states,
                host_lengths=(host_mel, host_samples),
            )
            inputs_embeds = self.merge_audio(input_ids, inputs_embeds, audio_embeds, tokens_per_clip, placeholders)
        if use_cache is None and cache is None and attention_mask is None and position_ids is not None:
            # A padding-free packed row: transformers reads restarting position ids as example boundaries only when
            # there is no cache, and would otherwise start one (config.use_cache) and attend across examples.
            use_cache = False
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{CACHE_NAME: cache},
            **kwargs,
        )
        return EmoReasonModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            audio_hidden_states=audio_embeds,
        )


class EmoReasonForConditionalGeneration(EmoReasonPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: EmoReasonConfig):
        super().__init__(config)
        self.model = EmoReasonModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def get_audio_encoder(self) -> EmoReasonAudioEncoder:
        """The whole audio path (towers + projector); also reached through a PEFT wrapper."""
        return self.model.audio_encoder

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        input_values: torch.FloatTensor | None = None,
        input_values_mask: torch.Tensor | None = None,
        content_states: torch.FloatTensor | None = None,
        paralinguistic_states: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> EmoReasonCausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=_take_cache(past_key_values, kwargs),
            inputs_embeds=inputs_embeds,
            input_features=input_features,
            input_features_mask=input_features_mask,
            input_values=input_values,
            input_values_mask=input_values_mask,
            content_states=content_states,
            paralinguistic_states=paralinguistic_states,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return EmoReasonCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            audio_hidden_states=outputs.audio_hidden_states,
        )

    def generate(self, *args, **kwargs):
        # The model must never write an `<audio>` placeholder itself.
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        processors.append(SuppressTokensLogitsProcessor([self.config.audio_token_id], device=self.device))
        return super().generate(*args, logits_processor=processors, **kwargs)

    # -- assembly from pretrained parts -------------------------------------------------------------------------
    @classmethod
    def from_components(
        cls,
        content_encoder: str | os.PathLike,
        paralinguistic_encoder: str | os.PathLike,
        language_model: str | os.PathLike,
        audio_token_id: int | None = None,
        vocab_size: int | None = None,
        dtype: torch.dtype | str | None = None,
        attn_implementation: str | None = None,
        **config_kwargs,
    ) -> EmoReasonForConditionalGeneration:
        """Build the composite from three pretrained checkpoints, each loaded with its own ``from_pretrained``.

        ``audio_token_id`` and ``vocab_size`` come from the tokenizer after the `<audio>` token was added (see
        :func:`emoreason.modeling.build_from_components`, which does both). The projector starts from scratch.
        """
        from transformers import AutoModelForCausalLM, WhisperConfig

        load_kwargs = safe_load_kwargs(**({"dtype": dtype} if dtype is not None else {}))
        if attn_implementation is not None:
            load_kwargs["attn_implementation"] = attn_implementation
        whisper_config = WhisperConfig.from_pretrained(content_encoder)
        # Only the encoder is needed: map the full model's "model.encoder.*" keys onto WhisperEncoder.
        # The decoder's tensors are skipped on purpose; silence the load report that would list each one.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            whisper, info = WhisperEncoder.from_pretrained(
                content_encoder, config=whisper_config, key_mapping={r"^model\.encoder\.": "", r"^encoder\.": ""},
                output_loading_info=True, **load_kwargs,
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        missing = [k for k in info["missing_keys"] if "embed_positions" not in k]
        if missing:
            raise ValueError(f"{content_encoder}: no Whisper encoder weights found for {sorted(missing)[:3]}")
        para_kwargs = dict(load_kwargs)
        if attn_implementation is not None:  # eager where the family has no such kernel (WavLM)
            para_config = AutoConfig.from_pretrained(paralinguistic_encoder)
            para_kwargs["attn_implementation"] = attn_implementation_per_part(
                {"part": para_config}, attn_implementation)["part"]
        paralinguistic = AutoModel.from_pretrained(paralinguistic_encoder, **para_kwargs)
        causal_lm = AutoModelForCausalLM.from_pretrained(language_model, **load_kwargs)
        # Grow the embeddings only when the tokenizer (with `<audio>`) outgrew them: real checkpoints pad their tables
        # past the tokenizer (Qwen2.5: 151,666 tokens, 152,064 rows), and cutting them would only cost speed.
        if vocab_size is not None and vocab_size > causal_lm.get_input_embeddings().num_embeddings:
            causal_lm.resize_token_embeddings(vocab_size, mean_resizing=True)
        text_config = causal_lm.config
        config = EmoReasonConfig(
            content_config=whisper.config.to_dict(),
            paralinguistic_config=paralinguistic.config.to_dict(),
            text_config=text_config.to_dict(),
            audio_token_id=audio_token_id if audio_token_id is not None else text_config.vocab_size - 1,
            **config_kwargs,
        )
        with torch.device("meta"):
            model = cls(config)
        audio_encoder = model.model.audio_encoder
        audio_encoder.content_encoder = whisper
        audio_encoder.paralinguistic_encoder = paralinguistic
        projector = build_projector(config)
        model._init_weights(projector)
        audio_encoder.projector = projector.to(dtype=causal_lm.dtype)
        audio_encoder.apply_freezing()
        model.model.language_model = causal_lm.model if hasattr(causal_lm, "model") else causal_lm.base_model
        model.lm_head = causal_lm.get_output_embeddings()
        if config.tie_word_embeddings:
            model.tie_weights()
        meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
        if meta:
            raise RuntimeError(f"parameters left uninitialised after assembly: {meta[:5]}")
        model.generation_config = causal_lm.generation_config
        return model


__all__ = [
    "AudioPlaceholderError",
    "EmoReasonModel",
    "EmoReasonPreTrainedModel",
    "EmoReasonForConditionalGeneration",
]
