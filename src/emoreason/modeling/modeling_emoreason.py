"""EmoReason: a dual-encoder audio LLM in the LLaVA / Qwen2-Audio layout.

``EmoReasonModel`` holds the content encoder (Whisper encoder: what is said), the paralinguistic encoder (WavLM,
HuBERT or wav2vec2: how it is said), the fusion projector and ``language_model``. ``EmoReasonForConditionalGeneration``
is ``model`` + ``lm_head``, so TRL trainers (``model.base_model`` + ``get_output_embeddings()``) and ``generate`` work
unchanged.

Audio costs what it lasts: each batch is encoded for its longest clip, never padded to Whisper's 30 s window. The
number of audio tokens of a clip is :func:`~emoreason.data.audio_tokens.num_audio_tokens` of its length, the same
function the processor uses.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.generation import LogitsProcessorList, SuppressTokensLogitsProcessor
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.whisper.modeling_whisper import WhisperEncoder
from transformers.utils import logging as hf_logging

from ..data.audio_tokens import num_encoder_frames_from_mel
from .configuration_emoreason import EmoReasonConfig
from .fusion import get_fusion
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


def _masked_group_norm_features(extractor: nn.Module, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """A group-norm feature encoder (wavlm-base, hubert-base, wav2vec2-base) over a padded batch in one call, each
    clip's first layer normalised over its own frames only: what running it on each clip alone gives.

    The convolutions have no padding, so a clip's valid output frames depend on its valid input frames only; only the
    first layer's GroupNorm (one group per channel, statistics over time) mixes in padding, so it is recomputed with
    the statistics of each clip's valid frames. ``values`` (B, samples), ``lengths`` (B,) samples per clip."""
    first = extractor.conv_layers[0]
    hidden = first.conv(values[:, None])
    frames = (lengths - first.conv.kernel_size[0]) // first.conv.stride[0] + 1
    norm = first.layer_norm
    batch, channels, length = hidden.shape
    valid = (torch.arange(length, device=hidden.device)[None, :] < frames[:, None]).to(torch.float32)
    grouped = hidden.float().reshape(batch, norm.num_groups, channels // norm.num_groups, length)
    weight = valid[:, None, None, :]
    count = (frames.to(torch.float32) * (channels // norm.num_groups)).clamp(min=1)[:, None, None, None]
    mean = (grouped * weight).sum((2, 3), keepdim=True) / count
    var = (((grouped - mean) * weight) ** 2).sum((2, 3), keepdim=True) / count
    normed = ((grouped - mean) * torch.rsqrt(var + norm.eps)).reshape(batch, channels, length).to(hidden.dtype)
    if norm.affine:
        normed = normed * norm.weight[None, :, None] + norm.bias[None, :, None]
    hidden = first.activation(normed)
    for layer in extractor.conv_layers[1:]:
        hidden = layer(hidden)
    return hidden


def _run_ssl_encoder(encoder: nn.Module, hidden: torch.Tensor, frame_mask: torch.Tensor,
                     all_layers: bool) -> torch.Tensor:
    """The transformer of a WavLM / HuBERT / wav2vec2 model, driven layer by layer (as the library's encoder does),
    so that every layer's state is at hand without hooks and nothing reads tensor values back to the host: the
    library zeroes padded frames by boolean indexing (a device-to-host sync on every call); here a multiply does.

    Returns (layers + 1, B, T, D) when ``all_layers`` (the first layer's input, then each layer's output, before a
    pre-norm model's final layer norm: the layout the layer weights were trained on), else the encoder's last hidden
    state (after that final norm). A layer skipped by LayerDrop passes its input through, as skipping means."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    from transformers.masking_utils import create_bidirectional_mask

    config = encoder.config
    layers = encoder.layers
    stable = bool(getattr(config, "do_stable_layer_norm", False))
    wavlm = "position_bias" in inspect.signature(type(layers[0]).forward).parameters
    hidden = hidden * frame_mask.unsqueeze(-1).to(hidden.dtype)
    # WavLM's layers take the frame mask as is; HuBERT's and wav2vec2's take the library's bidirectional mask.
    mask = frame_mask if wavlm else create_bidirectional_mask(config=config, inputs_embeds=hidden,
                                                              attention_mask=frame_mask)
    hidden = hidden + encoder.pos_conv_embed(hidden)
    if not stable:
        hidden = encoder.layer_norm(hidden)
    hidden = encoder.dropout(hidden)
    states = [hidden] if all_layers else None
    layerdrop = config.layerdrop if encoder.training else 0.0
    synced = is_deepspeed_zero3_enabled()  # every rank must run every layer under ZeRO-3
    position_bias = None
    for i, layer in enumerate(layers):
        skip = layerdrop > 0.0 and (i > 0 or not wavlm) and bool(torch.rand([], device="cpu") < layerdrop)
        if not skip or synced:
            if wavlm:
                hidden, position_bias = layer(hidden, attention_mask=mask, position_bias=position_bias,
                                              **({"index": i} if not stable else {}))
            else:
                hidden = layer(hidden, attention_mask=mask)
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        if all_layers:
            states.append(hidden)
    if all_layers:
        return torch.stack(states, dim=0)
    return encoder.layer_norm(hidden) if stable else hidden


def _host_lengths(mel_lengths: torch.Tensor, sample_lengths: torch.Tensor,
                  placeholders: torch.Tensor | None = None) -> tuple[list[int], list[int], list[int]]:
    """Mel frames and samples per clip (and `<audio>` placeholders per row) on the host, in ONE read: the lengths that
    slicing and the placeholder check need, read before any of the step's kernels are queued, instead of a sync in
    the middle of each tower."""
    parts = [mel_lengths.long(), sample_lengths.long().to(mel_lengths.device)]
    if placeholders is not None:
        parts.append(placeholders.long().to(mel_lengths.device))
    values = torch.cat(parts).tolist()
    clips = mel_lengths.shape[0]
    return values[:clips], values[clips : 2 * clips], values[2 * clips :]


class EmoReasonProjector(nn.Module):
    """Fuses the two towers frame by frame (50 Hz), stacks ``stack_factor`` frames, and maps them to LM embeddings.

    Also owns the learned layer weights of the paralinguistic encoder, so that everything trainable on the audio side
    is one module (saved with LoRA adapters through ``modules_to_save=["projector"]``).
    """

    def __init__(self, config: EmoReasonConfig):
        super().__init__()
        content_dim = config.content_config.d_model
        para_dim = config.paralinguistic_config.hidden_size
        text_dim = config.text_config.hidden_size
        hidden = config.projector_hidden_size or text_dim
        self.fusion = config.fusion
        self.stack_factor = config.stack_factor
        self.layer_weights = (
            nn.Parameter(torch.zeros(config.paralinguistic_config.num_hidden_layers + 1))
            if config.paralinguistic_weighted_layers
            else None
        )
        self.paralinguistic_norm = nn.LayerNorm(para_dim)
        # Global mean-variance normalisation of both towers' outputs (per dimension; per layer for the paralinguistic
        # states), with statistics measured on training clips (emoreason.train.feature_norm). Identity until then.
        self.feature_norm = config.feature_norm
        para_layers = config.paralinguistic_config.num_hidden_layers + 1 if config.paralinguistic_weighted_layers else 1
        self.register_buffer("content_mean", torch.zeros(content_dim))
        self.register_buffer("content_std", torch.ones(content_dim))
        self.register_buffer("paralinguistic_mean", torch.zeros(para_layers, para_dim))
        self.register_buffer("paralinguistic_std", torch.ones(para_layers, para_dim))
        self.register_buffer("feature_norm_frames", torch.zeros((), dtype=torch.long))
        self._fusion = get_fusion(self.fusion)  # emoreason.modeling.fusion: adds the mode's layers, fixed names
        frame_dim = self._fusion.build(self, content_dim, para_dim)
        self.linear_1 = nn.Linear(frame_dim * config.stack_factor, hidden)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden, text_dim)

    @property
    def feature_norm_fitted(self) -> bool:
        return self.feature_norm == "global_mvn" and int(self.feature_norm_frames) > 0

    @torch.no_grad()
    def set_feature_stats(self, content_mean, content_std, paralinguistic_mean, paralinguistic_std, frames: int):
        """Install normalisation statistics ((Dc,), (Dc,), (L, Dp), (L, Dp)); stds are floored at 1e-5."""
        for name, value in (("content_mean", content_mean), ("content_std", content_std),
                            ("paralinguistic_mean", paralinguistic_mean), ("paralinguistic_std", paralinguistic_std)):
            buffer = getattr(self, name)
            value = torch.as_tensor(value, dtype=torch.float32).reshape(buffer.shape)
            if name.endswith("_std"):
                value = value.clamp(min=1e-5)
            buffer.copy_(value.to(device=buffer.device, dtype=buffer.dtype))
        self.feature_norm_frames.fill_(int(frames))

    def normalize_content(self, content: torch.Tensor) -> torch.Tensor:
        if self.feature_norm != "global_mvn":
            return content
        mean, std = self.content_mean.float(), self.content_std.float()
        return ((content.float() - mean) / std).to(content.dtype)

    def normalize_paralinguistic(self, states: torch.Tensor) -> torch.Tensor:
        """(layers, B, T, D) with one statistic per layer, or (B, T, D) with the last layer's."""
        if self.feature_norm != "global_mvn":
            return states
        mean, std = self.paralinguistic_mean.float(), self.paralinguistic_std.float()
        if states.dim() == 4 and mean.shape[0] == states.shape[0]:
            mean, std = mean[:, None, None, :], std[:, None, None, :]
        else:
            mean, std = mean[-1], std[-1]
        return ((states.float() - mean) / std).to(states.dtype)

    def mix_layers(self, paralinguistic_states: torch.Tensor) -> torch.Tensor:
        """(layers, B, T, D) or (B, T, D) -> (B, T, D)."""
        paralinguistic_states = self.normalize_paralinguistic(paralinguistic_states)
        if paralinguistic_states.dim() == 4:
            if self.layer_weights is None:
                paralinguistic_states = paralinguistic_states[-1]
            else:
                weights = torch.softmax(self.layer_weights.float(), dim=0).to(paralinguistic_states.dtype)
                paralinguistic_states = torch.einsum("l,lbtd->btd", weights, paralinguistic_states)
        return self.paralinguistic_norm(paralinguistic_states)

    def forward(self, content: torch.Tensor, paralinguistic: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """content (B, T, Dc), paralinguistic (B, T, Dp) frame-aligned, frame_mask (B, T) -> (B, ceil(T/k), D_lm).

        ``paralinguistic`` is the output of :meth:`mix_layers` (already normalised); ``content`` is normalised here."""
        content = self.normalize_content(content)
        frames = self._fusion.fuse(self, content, paralinguistic)
        # Frames past a clip's end are zeroed so a clip's tokens never depend on what it was batched with.
        frames = frames * frame_mask.unsqueeze(-1).to(frames.dtype)
        batch, length, dim = frames.shape
        pad = (-length) % self.stack_factor
        if pad:
            frames = nn.functional.pad(frames, (0, 0, 0, pad))
        stacked = frames.reshape(batch, (length + pad) // self.stack_factor, dim * self.stack_factor)
        return self.linear_2(self.act(self.linear_1(stacked)))


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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``attn_implementation="sdpa"`` (one name, as recipes give it) is applied to each part that has that kernel,
        and eager attention to the others (WavLM), as at assembly; see :func:`~.loading.attn_implementation_per_part`."""
        requested = kwargs.get("attn_implementation")
        if isinstance(requested, str):
            config = kwargs.get("config")
            if not isinstance(config, EmoReasonConfig):
                config = EmoReasonConfig.from_pretrained(pretrained_model_name_or_path)
            kwargs["attn_implementation"] = attn_implementation_per_part(
                {name: getattr(config, name) for name in config.sub_configs}, requested)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def _init_weights(self, module):
        std = getattr(self.config.get_text_config(), "initializer_range", 0.02)
        if isinstance(module, EmoReasonProjector):
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, mean=0.0, std=std)
                    nn.init.zeros_(layer.bias)
                elif isinstance(layer, nn.LayerNorm):
                    nn.init.ones_(layer.weight)
                    nn.init.zeros_(layer.bias)
            if module.layer_weights is not None:
                nn.init.zeros_(module.layer_weights)
            module.content_mean.zero_()
            module.content_std.fill_(1.0)
            module.paralinguistic_mean.zero_()
            module.paralinguistic_std.fill_(1.0)
            module.feature_norm_frames.zero_()
        elif isinstance(module, nn.Linear) and module is getattr(self, "lm_head", None):
            nn.init.normal_(module.weight, mean=0.0, std=std)


class EmoReasonModel(EmoReasonPreTrainedModel):
    def __init__(self, config: EmoReasonConfig):
        super().__init__(config)
        self.content_encoder = WhisperEncoder(config.content_config)
        self.paralinguistic_encoder = AutoModel.from_config(config.paralinguistic_config)
        self.projector = EmoReasonProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.apply_freezing()
        self.post_init()

    # -- trainability -----------------------------------------------------------------------------------------
    def apply_freezing(self) -> None:
        self.content_encoder.requires_grad_(self.config.train_content_encoder)
        self.paralinguistic_encoder.requires_grad_(self.config.train_paralinguistic_encoder)

    def train(self, mode: bool = True):
        # Frozen towers stay in eval mode: no dropout, LayerDrop or SpecAugment masking on features we don't train.
        super().train(mode)
        if not self.config.train_content_encoder:
            self.content_encoder.eval()
        if not self.config.train_paralinguistic_encoder:
            self.paralinguistic_encoder.eval()
        return self

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    # -- audio ------------------------------------------------------------------------------------------------
    def encode_content(self, input_features: torch.Tensor, mel_lengths: torch.Tensor,
                       host_mel_lengths: list[int] | None = None) -> torch.Tensor:
        """Whisper encoder over the batch's own length (not 30 s): position table sliced, padding masked.

        ``host_mel_lengths``: ``mel_lengths`` already on the host (``get_audio_features`` reads every length once);
        without it they are read here."""
        enc = self.content_encoder
        if host_mel_lengths is None:
            host_mel_lengths = mel_lengths.tolist()
        max_mel = max(host_mel_lengths)
        features = input_features[..., :max_mel].to(enc.conv1.weight.dtype)
        mel_mask = (torch.arange(max_mel, device=features.device)[None, :] < mel_lengths[:, None]).unsqueeze(1)
        # Zeroing padded mel and conv1 outputs reproduces the zero padding a lone clip gets from the convolutions.
        hidden = nn.functional.gelu(enc.conv1(features * mel_mask))
        hidden = nn.functional.gelu(enc.conv2(hidden * mel_mask)).permute(0, 2, 1)
        length = hidden.shape[1]
        if length > enc.embed_positions.num_embeddings:
            raise ValueError(
                f"audio of {length} encoder frames exceeds the content encoder's {enc.embed_positions.num_embeddings}"
                " positions; the processor cuts clips to the encoder's window"
            )
        hidden = hidden + enc.embed_positions.weight[:length].to(hidden.dtype)
        hidden = nn.functional.dropout(hidden, p=enc.dropout, training=enc.training)
        attention_mask = None
        if min(num_encoder_frames_from_mel(n) for n in host_mel_lengths) < length:
            frame_lengths = num_encoder_frames_from_mel(mel_lengths)
            keep = torch.arange(length, device=hidden.device)[None, :] < frame_lengths[:, None]
            attention_mask = torch.zeros(keep.shape, dtype=hidden.dtype, device=hidden.device)
            attention_mask = attention_mask.masked_fill(~keep, torch.finfo(hidden.dtype).min)[:, None, None, :]
            attention_mask = attention_mask.expand(-1, 1, length, length)
        for layer in enc.layers:
            hidden = layer(hidden, attention_mask)
        return enc.layer_norm(hidden)

    def encode_paralinguistic(
        self, input_values: torch.Tensor, input_values_mask: torch.Tensor | None,
        host_sample_lengths: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns hidden states ((layers, B, L, D) when layer-weighted, else (B, L, D)) and frame lengths (B,).

        A clip's states do not depend on what it is batched with: group-norm feature encoders (wavlm-base,
        hubert-base: normalised over time) normalise each clip over its own frames, and the transformer masks padded
        frames. One batched call per tower; ``host_sample_lengths`` as in :meth:`encode_content`.
        """
        enc = self.paralinguistic_encoder
        values = input_values.to(next(enc.parameters()).dtype)
        if input_values_mask is None:
            input_values_mask = torch.ones(values.shape, dtype=torch.long, device=values.device)
        sample_lengths = input_values_mask.sum(-1)
        if host_sample_lengths is None:
            host_sample_lengths = sample_lengths.tolist()
        longest = max(host_sample_lengths)
        values = values[:, :longest]
        group_norm = getattr(self.config.paralinguistic_config, "feat_extract_norm", "layer") == "group"
        if group_norm and min(host_sample_lengths) != longest:
            extract = _masked_group_norm_features(enc.feature_extractor, values, sample_lengths).transpose(1, 2)
        else:
            extract = enc.feature_extractor(values).transpose(1, 2)
        # The frame mask from the frame lengths: the encoders' own helper for it differs in signature across families
        # (HuBERT's takes no ``add_adapter``), the length formula does not.
        frame_lengths = enc._get_feat_extract_output_lengths(sample_lengths).long().clamp(min=1)
        frame_mask = torch.arange(extract.shape[1], device=extract.device)[None, :] < frame_lengths[:, None]
        projected = enc.feature_projection(extract)
        hidden = projected[0] if isinstance(projected, tuple) else projected
        states = _run_ssl_encoder(enc.encoder, hidden, frame_mask, self.config.paralinguistic_weighted_layers)
        return states, frame_lengths

    def get_audio_features(
        self,
        input_features: torch.Tensor,
        input_features_mask: torch.Tensor,
        input_values: torch.Tensor,
        input_values_mask: torch.Tensor | None = None,
        content_states: torch.Tensor | None = None,
        paralinguistic_states: torch.Tensor | None = None,
        host_lengths: tuple[list[int], list[int]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch of clips. Returns (audio embeddings (clips, max_tokens, D_lm), tokens per clip (clips,)).

        ``content_states`` / ``paralinguistic_states`` (precomputed tower outputs, e.g. from the feature cache) skip the
        towers; they must be what :meth:`encode_content` / :meth:`encode_paralinguistic` return for the same clips.
        ``host_lengths``: (mel frames, samples) per clip as host lists (see ``_host_lengths``); read here if absent.
        """
        mel_lengths = input_features_mask.sum(-1).long()
        frame_lengths = num_encoder_frames_from_mel(mel_lengths)
        sample_lengths = (
            input_values_mask.sum(-1) if input_values_mask is not None
            else torch.full((input_values.shape[0],), input_values.shape[-1], device=input_values.device)
        )
        if host_lengths is None:
            host_lengths = _host_lengths(mel_lengths, sample_lengths)[:2]
        host_mel, host_samples = host_lengths
        if content_states is None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.train_content_encoder):
                content_states = self.encode_content(input_features, mel_lengths, host_mel)
        if paralinguistic_states is None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.train_paralinguistic_encoder):
                paralinguistic_states, para_lengths = self.encode_paralinguistic(
                    input_values, input_values_mask, host_samples)
        else:
            para_lengths = self.paralinguistic_encoder._get_feat_extract_output_lengths(sample_lengths).long()
        projector_dtype = self.projector.linear_1.weight.dtype
        para = self.projector.mix_layers(paralinguistic_states.to(projector_dtype))
        # Align the towers frame by frame: both run at 50 Hz, WavLM's convolutions give a frame or two fewer.
        length = content_states.shape[1]
        index = torch.arange(length, device=para.device)[None, :].expand(para.shape[0], -1)
        index = torch.minimum(index, (para_lengths.to(para.device) - 1).clamp(min=0)[:, None])
        para = torch.gather(para, 1, index.unsqueeze(-1).expand(-1, -1, para.shape[-1]))
        frame_mask = torch.arange(length, device=para.device)[None, :] < frame_lengths.to(para.device)[:, None]
        embeds = self.projector(content_states.to(projector_dtype), para, frame_mask)
        tokens_per_clip = (frame_lengths + self.config.stack_factor - 1) // self.config.stack_factor
        return embeds, tokens_per_clip

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
            mel_lengths = input_features_mask.sum(-1).long()
            sample_lengths = (input_values_mask.sum(-1) if input_values_mask is not None
                              else torch.full((mel_lengths.shape[0],), input_values.shape[-1], device=mel_lengths.device))
            # every length the step needs on the host, read once before the towers' kernels are queued
            host_mel, host_samples, placeholders = _host_lengths(
                mel_lengths, sample_lengths, (input_ids == self.config.audio_token_id).sum(-1))
            audio_embeds, _ = self.get_audio_features(
                input_features, input_features_mask, input_values, input_values_mask,
                content_states=content_states, paralinguistic_states=paralinguistic_states,
                host_lengths=(host_mel, host_samples),
            )
            tokens_per_clip = [-(-num_encoder_frames_from_mel(n) // self.config.stack_factor) for n in host_mel]
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

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.train(mode)
        return self

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
        model.model.content_encoder = whisper
        model.model.paralinguistic_encoder = paralinguistic
        model.model.language_model = causal_lm.model if hasattr(causal_lm, "model") else causal_lm.base_model
        model.lm_head = causal_lm.get_output_embeddings()
        projector = EmoReasonProjector(config)
        model._init_weights(projector)
        model.model.projector = projector.to(dtype=causal_lm.dtype)
        model.model.apply_freezing()
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
    "EmoReasonProjector",
]
