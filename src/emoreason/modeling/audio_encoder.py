"""The audio path, one module: both towers, the layer-weighted sum, frame alignment, fusion, stacking, the projector.

:class:`EmoReasonAudioEncoder` owns the content encoder (Whisper's encoder: what is said), the paralinguistic encoder
(WavLM, HuBERT or wav2vec2: how it is said) and :class:`EmoReasonProjector`, and turns a padded batch of clips into
language-model embeddings: ``(embeddings (clips, max_tokens, D_lm), tokens per clip)``. The training model holds it
as ``model.audio_encoder`` and the vLLM model builds the same class, so serving runs the code that was trained.

Audio costs what it lasts: each batch is encoded for its longest clip, never padded to Whisper's 30 s window, and a
clip's embeddings never depend on what it is batched with. The tokens of a clip are
:func:`~emoreason.data.audio_tokens.num_audio_tokens_from_mel` of its mel frames, the rule the processor uses.

To swap the projector for another design, change :func:`build_projector` (and :func:`init_audio_weights`, which
initialises a fresh one); the towers, the alignment and every caller stay as they are.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import AutoModel
from transformers.activations import ACT2FN
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from ..data.audio_tokens import num_audio_tokens_from_mel, num_encoder_frames_from_mel
from .configuration_emoreason import EmoReasonConfig
from .fusion import get_fusion

# Checkpoints written before the audio path had one owner hold its parts directly under the composite
# (``model.projector.*``, ...); they now live under ``model.audio_encoder``. The one statement of that renaming, given
# to every loader: transformers' ``from_pretrained`` (``key_mapping``), PEFT's adapter loading
# (``_checkpoint_conversion_mapping``, which PEFT reads for ``modules_to_save`` keys) and the vLLM weight mapper.
LEGACY_CHECKPOINT_KEYS = {
    r"^model\.(content_encoder|paralinguistic_encoder|projector)\.": r"model.audio_encoder.\1.",
}


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


def clip_lengths(input_features_mask: torch.Tensor, input_values: torch.Tensor | None,
                 input_values_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mel frames and samples per clip (on the device) from the processor's masks; without a waveform mask every
    clip fills the batch's waveform length."""
    mel_lengths = input_features_mask.sum(-1).long()
    if input_values_mask is not None:
        return mel_lengths, input_values_mask.sum(-1)
    return mel_lengths, torch.full((mel_lengths.shape[0],), input_values.shape[-1], device=mel_lengths.device)


def read_host_lengths(mel_lengths: torch.Tensor, sample_lengths: torch.Tensor,
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

    Also owns the learned layer weights of the paralinguistic encoder and the feature-normalisation statistics, so
    that everything trainable on the audio side is one module (saved with LoRA adapters through
    ``modules_to_save=["projector"]``, which PEFT matches by name wherever the module sits).
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
    def dtype(self) -> torch.dtype:
        """What the tower states are cast to before layer mixing and fusion."""
        return self.linear_1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.linear_1.weight.device

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


def build_projector(config: EmoReasonConfig) -> nn.Module:
    """The projector of ``config``: the one place it is built (the model, assembly from parts and vLLM all come here).

    Whatever it returns must offer what :class:`EmoReasonProjector` does to the rest of the audio path: ``dtype`` and
    ``device``, ``mix_layers`` (tower states -> mixed paralinguistic frames), ``forward(content, paralinguistic,
    frame_mask)`` -> (B, tokens, D_lm) with ``stack_factor`` frames per token, and the feature-normalisation buffers
    and ``set_feature_stats`` that ``emoreason.train.feature_norm`` fills."""
    return EmoReasonProjector(config)


@torch.no_grad()
def init_audio_weights(module: nn.Module, std: float) -> bool:
    """Initialise a freshly built projector (LM-style normal linears, unit layer norms, uniform layer weights, identity
    feature normalisation). Returns False for any other module, which the caller initialises itself."""
    if not isinstance(module, EmoReasonProjector):
        return False
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
    return True


def pad_clips(clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad clips along their last (time) axis with zeros; returns (batch, mask (clips, time))."""
    longest = max(int(c.shape[-1]) for c in clips)
    batch = clips[0].new_zeros((len(clips), *clips[0].shape[:-1], longest))
    mask = torch.zeros((len(clips), longest), dtype=torch.long, device=clips[0].device)
    for i, clip in enumerate(clips):
        batch[i, ..., : clip.shape[-1]] = clip
        mask[i, : clip.shape[-1]] = 1
    return batch, mask


class EmoReasonAudioEncoder(nn.Module):
    """Clips -> language-model embeddings: the content and paralinguistic towers and the projector.

    Towers are frozen unless the config trains them (``train_content_encoder`` / ``train_paralinguistic_encoder``), and
    frozen towers stay in eval mode whatever mode the model is put in (no dropout, LayerDrop or SpecAugment masking on
    features that are not trained)."""

    def __init__(self, config: EmoReasonConfig):
        super().__init__()
        self.config = config
        self.content_encoder = WhisperEncoder(config.content_config)
        self.paralinguistic_encoder = AutoModel.from_config(config.paralinguistic_config)
        self.projector = build_projector(config)
        self.apply_freezing()

    # -- trainability -----------------------------------------------------------------------------------------
    def apply_freezing(self) -> None:
        self.content_encoder.requires_grad_(self.config.train_content_encoder)
        self.paralinguistic_encoder.requires_grad_(self.config.train_paralinguistic_encoder)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.config.train_content_encoder:
            self.content_encoder.eval()
        if not self.config.train_paralinguistic_encoder:
            self.paralinguistic_encoder.eval()
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The projector's dtype: both towers' states are cast to it before they are mixed and fused."""
        return self.projector.dtype

    @property
    def device(self) -> torch.device:
        return self.projector.device

    # -- towers -----------------------------------------------------------------------------------------------
    def encode_content(self, input_features: torch.Tensor, mel_lengths: torch.Tensor,
                       host_mel_lengths: list[int] | None = None) -> torch.Tensor:
        """Whisper encoder over the batch's own length (not 30 s): position table sliced, padding masked.

        ``host_mel_lengths``: ``mel_lengths`` already on the host (:meth:`forward` reads every length once);
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

    # -- the batch ------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_features: torch.Tensor,
        input_features_mask: torch.Tensor,
        input_values: torch.Tensor,
        input_values_mask: torch.Tensor | None = None,
        content_states: torch.Tensor | None = None,
        paralinguistic_states: torch.Tensor | None = None,
        host_lengths: tuple[list[int], list[int]] | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        """Encode a batch of clips. Returns (audio embeddings (clips, max_tokens, D_lm), tokens per clip (host ints)).

        ``content_states`` / ``paralinguistic_states`` (precomputed tower outputs, e.g. from the feature cache) skip the
        towers; they must be what :meth:`encode_content` / :meth:`encode_paralinguistic` return for the same clips.
        ``host_lengths``: (mel frames, samples) per clip as host lists (see :func:`read_host_lengths`); read here if
        absent. A clip's tokens are ``num_audio_tokens_from_mel`` of its mel frames, the processor's count.
        """
        mel_lengths, sample_lengths = clip_lengths(input_features_mask, input_values, input_values_mask)
        frame_lengths = num_encoder_frames_from_mel(mel_lengths)
        if host_lengths is None:
            host_lengths = read_host_lengths(mel_lengths, sample_lengths)[:2]
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
        projector_dtype = self.dtype
        para = self.projector.mix_layers(paralinguistic_states.to(projector_dtype))
        # Align the towers frame by frame: both run at 50 Hz, WavLM's convolutions give a frame or two fewer.
        length = content_states.shape[1]
        index = torch.arange(length, device=para.device)[None, :].expand(para.shape[0], -1)
        index = torch.minimum(index, (para_lengths.to(para.device) - 1).clamp(min=0)[:, None])
        para = torch.gather(para, 1, index.unsqueeze(-1).expand(-1, -1, para.shape[-1]))
        frame_mask = torch.arange(length, device=para.device)[None, :] < frame_lengths.to(para.device)[:, None]
        embeds = self.projector(content_states.to(projector_dtype), para, frame_mask)
        return embeds, [num_audio_tokens_from_mel(n, self.config.stack_factor) for n in host_mel]

    def embed_clips(self, input_features: list[torch.Tensor], input_values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-clip features (n_mels, frames) and waveforms (samples,) -> per-clip embeddings (tokens, D_lm).

        The clips are encoded in ONE call, padded and masked exactly as a training batch is (the layout of
        ``EmoReasonProcessor.audio_features``), so a clip's embeddings never depend on the clips beside it. What the
        vLLM model runs on each batch of clips it schedules."""
        if not input_features:
            return []
        features, features_mask = pad_clips([f.to(self.device) for f in input_features])
        values, values_mask = pad_clips([v.to(self.device) for v in input_values])
        embeds, tokens = self(features, features_mask, values, values_mask)
        return [embeds[i, :n] for i, n in enumerate(tokens)]


__all__ = [
    "LEGACY_CHECKPOINT_KEYS",
    "EmoReasonAudioEncoder",
    "EmoReasonProjector",
    "build_projector",
    "clip_lengths",
    "init_audio_weights",
    "pad_clips",
    "read_host_lengths",
]
