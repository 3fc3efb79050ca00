"""An audio-aware GRPO trainer: TRL's ``GRPOTrainer`` with the clip carried into generation and every log-prob pass.

TRL 1.16's multimodal path knows images only; given our prompts it would render the `<audio>` placeholder as a plain
token and **train without audio, silently**. This subclass overrides seven of TRL's private methods (TRL is pinned to
the minor release they were written against: pyproject.toml, constraints.txt; `make test-newest` runs the GRPO tests
on the newest TRL too) and ``train``. Four carry the audio:

- ``_tokenize_prompts``: each prompt carries its clip as a ``{"type": "audio", "audio": path}`` content part (as TRL
  prompts carry ``{"type": "image"}`` parts). The processor renders the chat, expands `<audio>` to the clip's token
  count and computes the audio tensors, which go to ``generate`` as its multimodal fields (one clip per row: GRPO's
  repeated prompts are separate rows).
- ``_generate_and_score_completions``: the same audio tensors are kept for the old/reference log-prob passes and
  returned in the batch, so TRL's shuffling and splitting keep them aligned with their rows.
- ``_compute_loss``: makes the batch's audio available to the policy log-prob pass.
- ``_get_per_token_logps_and_entropies``: sends the audio of each chunk of rows to the model, and refuses to run on
  rows that hold `<audio>` placeholders without audio (the silent failure above becomes an error).

With ``use_vllm`` (colocate mode), rollouts run in vLLM with the clips in ``multi_modal_data`` and the policy's full
state loaded into the engine after each optimizer step (:mod:`emoreason.train.vllm_rollouts`,
``_generate_single_turn``); the log-prob passes above are unchanged. Configurations that cannot carry audio to vLLM
(server mode, tensor-parallel engines, sleep mode) are refused with the reason.

``_generate_single_turn`` is the vLLM branch above. ``_calculate_rewards`` hands the rewards gathered from all
processes to every *group reward* (one with a ``group_hook``, e.g. the reasoning reward's trust weight and progressive
schedule, :class:`emoreason.train.rewards.ReasoningReward`), so every rank sees the same weights; the trainer names no
reward. Their state is written into each checkpoint by ``_save_checkpoint`` before the Trainer's own files
(``trainer_state.json``, which marks a checkpoint complete, comes last) and restored in ``train`` (transformers skips
``_load_from_checkpoint`` under DeepSpeed and FSDP).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint
from trl import GRPOTrainer
from trl.extras.profiling import profiling_context

from .rewards import group_rewards
from .vllm_rollouts import audio_rollout_engine, audio_vllm_refusal

logger = logging.getLogger(__name__)

REWARD_STATE_FILE = "reward_state.json"  # group rewards' state (the reasoning schedule), saved with each checkpoint
LEGACY_SCHEDULE_FILE = "reward_schedule.json"  # what checkpoints held before: the reasoning schedule alone
AUDIO_KEYS = ("input_features", "input_features_mask", "input_values", "input_values_mask")


class MissingAudioError(RuntimeError):
    """Rows with `<audio>` placeholders reached a log-prob pass without their audio."""


def prompt_audio(prompt: list[dict[str, Any]]) -> list[Any]:
    """The clips a conversational prompt carries, in order (``{"type": "audio", "audio": path_or_array}`` parts)."""
    clips = []
    for message in prompt:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if part.get("type") in ("audio", "input_audio"):
                    clip = part.get("audio")
                    if clip is None:
                        raise ValueError("an audio content part has no 'audio' (path or waveform); GRPO prompts must "
                                         "carry their clip: {'type': 'audio', 'audio': '/path/clip.wav'}")
                    clips.append(clip)
    return clips


def pin_reference_attention(model, args) -> None:
    """TRL builds the reference model with the policy's ``attn_implementation`` applied to every sub-model, which
    WavLM/HuBERT refuse for SDPA; hand it the per-sub-config choice the policy was loaded with instead."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "sub_configs", None):
        return
    init_kwargs = dict(args.model_init_kwargs or {})
    if "attn_implementation" not in init_kwargs:
        init_kwargs["attn_implementation"] = {
            "": config._attn_implementation,
            **{name: getattr(config, name)._attn_implementation for name in config.sub_configs},
        }
        args.model_init_kwargs = init_kwargs


def sync_reference_adapter(model, source: str = "default", target: str = "ref") -> int:
    """Make PEFT's ``target`` adapter an exact copy of ``source``: parameters *and buffers*. Returns how many tensors
    were copied (0 when the model has no ``target`` adapter).

    Started from a saved adapter, TRL's GRPO/DPO trainers add a frozen "ref" adapter and copy the "default" adapter's
    parameters into it. A ``modules_to_save`` module (our projector) gets its "ref" copy from the *base* module, and
    the copy loop skips buffers, so the reference projector keeps the base's feature-normalisation statistics
    (identity when SFT saved its base before measuring them) while the policy uses the fitted ones: the reference
    would hear differently normalised audio, GRPO's KL would not start at 0 and DPO's reference log-probs would be
    biased. Copying every tensor makes reference and policy identical at step 0.
    """
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, dict) or target not in peft_config:
        return 0
    src, dst = f".{source}.", f".{target}."
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    copied = 0
    with torch.no_grad():
        for name, tensor in tensors.items():
            if src not in name:
                continue
            twin = tensors.get(name.replace(src, dst))
            if twin is None:
                raise RuntimeError(f"the {target!r} adapter has no copy of {name}; cannot build the reference")
            if twin.shape != tensor.shape:
                raise RuntimeError(f"{name}: the {target!r} copy has shape {tuple(twin.shape)}, "
                                   f"{source!r} has {tuple(tensor.shape)}")
            twin.copy_(tensor)
            copied += 1
    return copied


class AudioGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` for :class:`~emoreason.modeling.EmoReasonForConditionalGeneration` (see the module docstring).

    The processor must be the :class:`~emoreason.modeling.EmoReasonProcessor`; prompts must be conversational.
    """

    def __init__(self, model, *args, **kwargs):
        config_args = kwargs.get("args")
        refusal = audio_vllm_refusal(config_args) if config_args is not None else None
        if refusal:
            raise ValueError(refusal)
        if config_args is not None and not isinstance(model, str):
            pin_reference_attention(model, config_args)
        # TRL suppresses "the image token" in sampling for any processor; for us that is `<audio>` (the model's own
        # generate suppresses it too). The attribute lives only for the constructor, so it is never saved.
        config = getattr(model, "config", None)
        borrowed = config is not None and not hasattr(config, "image_token_id")
        if borrowed:
            config.image_token_id = config.audio_token_id
        try:
            # With use_vllm, TRL builds its rollout engine through this name: ours feeds vLLM the clips.
            with audio_rollout_engine(getattr(model, "dtype", None)):
                super().__init__(model, *args, **kwargs)
        finally:
            if borrowed:
                del config.image_token_id
        self._rollout_audio: list | None = None
        sync_reference_adapter(self.model)
        self._audio_batch: dict[str, torch.Tensor] | None = None
        self._audio_token_id = self.processing_class.audio_token_id
        names = list(self.reward_func_names)
        self._group_rewards = group_rewards(self.reward_funcs)
        for func in self._group_rewards:
            missing = [r for r in getattr(func, "requires", ()) if r not in names]
            if missing:
                raise ValueError(f"the {func.__name__!r} reward reads the {missing} reward(s): add them to reward_funcs")

    # -- prompts -> token ids + audio ---------------------------------------------------------------------------
    def _tokenize_prompts(self, prompts: list):
        if not prompts or not isinstance(prompts[0], list):
            raise ValueError("AudioGRPOTrainer needs conversational prompts whose user turn holds an audio part")
        clips = [clip for prompt in prompts for clip in prompt_audio(prompt)]
        texts = self.processing_class.apply_chat_template(prompts, add_generation_prompt=True,
                                                          **self.chat_template_kwargs)
        loaded: dict[str, Any] = {}  # GRPO repeats each prompt num_generations times: decode each file once
        waveforms = []
        for clip in clips:
            if not isinstance(clip, str):
                waveforms.append(self.processing_class.load(clip))
                continue
            if clip not in loaded:
                loaded[clip] = self.processing_class.load(clip)
            waveforms.append(loaded[clip])
        encoded = self.processing_class(text=texts, audio=waveforms or None)
        prompt_ids = [ids[mask.bool()].tolist() for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])]
        audio = {k: encoded[k] for k in AUDIO_KEYS if k in encoded}
        if audio and audio["input_features"].shape[0] != len(prompts):
            raise ValueError(f"{audio['input_features'].shape[0]} clips for {len(prompts)} prompts: each GRPO prompt "
                             "carries exactly one clip")
        self._audio_batch = Trainer._prepare_inputs(self, audio) if audio else None
        self._rollout_audio = waveforms or None  # the clips themselves, for vLLM rollouts (one per row)
        # TRL hands these to `generate` alongside the left-padded prompt ids.
        return prompt_ids, None, dict(audio)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if not self.use_vllm:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        # TRL's vLLM branch, with the clips: weights after each optimizer step, then one completion per row.
        if self.state.global_step != self._last_loaded_step:
            with profiling_context(self, "sync_weights"):
                self.vllm_generation.sync_weights()
            self._last_loaded_step = self.state.global_step
        audio = self._rollout_audio or [None] * len(prompt_ids)
        _, completion_ids, logprobs = self.vllm_generation.generate_with_audio(
            prompt_ids, audio, profiler=profiling_context(self, "vLLM.generate"))
        return completion_ids, logprobs

    def _generate_and_score_completions(self, inputs):
        self._audio_batch = None
        try:
            output = super()._generate_and_score_completions(inputs)
            if self._audio_batch is not None:
                output.update(self._audio_batch)
        finally:
            self._audio_batch = None
        return output

    def _compute_loss(self, model, inputs):
        audio = {k: inputs[k] for k in AUDIO_KEYS if k in inputs}
        self._audio_batch = audio or None
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._audio_batch = None

    # -- log-probs with audio -------------------------------------------------------------------------------------
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **image_inputs):
        if any(v is not None for v in image_inputs.values() if not isinstance(v, list)):
            raise ValueError("AudioGRPOTrainer takes audio prompts, not images")
        audio = self._audio_batch
        if audio is None and bool((input_ids == self._audio_token_id).any()):
            raise MissingAudioError("rows hold `<audio>` placeholders but no audio reached this log-prob pass; "
                                    "training on them would silently ignore the clip")
        if audio is not None and audio["input_features"].shape[0] != input_ids.shape[0]:
            raise MissingAudioError(f"{audio['input_features'].shape[0]} clips for {input_ids.shape[0]} rows")
        batch_size = batch_size or input_ids.size(0)
        all_logps, all_entropies, all_aux = [], [], []
        for start in range(0, input_ids.size(0), batch_size):
            end = min(start + batch_size, input_ids.size(0))
            ids, mask = input_ids[start:end], attention_mask[start:end]
            model_inputs = {"input_ids": ids, "attention_mask": mask}
            if audio is not None:
                model_inputs.update({k: v[start:end] for k, v in audio.items()})
            if compute_aux_loss:
                model_inputs["output_router_logits"] = True
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, :-logits_to_keep] = -100  # only the completion tokens are scored
            with self.accelerator.autocast():
                outputs = model(**model_inputs, labels=labels, fused_lm_head=True)
            all_logps.append(outputs.log_probs[:, -logits_to_keep:])
            if compute_entropy:
                all_entropies.append(outputs.entropy[:, -logits_to_keep:])
            if compute_aux_loss:
                all_aux.append(outputs.aux_loss)
        logps = torch.cat(all_logps, dim=0)
        entropies = torch.cat(all_entropies, dim=0) if compute_entropy else None
        aux_loss = torch.stack(all_aux).mean() if compute_aux_loss else None
        return logps, entropies, aux_loss

    # -- group rewards: a hook on the whole reward table of a step, and state that travels with checkpoints ----------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)  # all processes
        if not self._group_rewards:
            return rewards
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        for func in self._group_rewards:
            for key, value in func.group_hook(rewards, list(self.reward_func_names), num_generations,
                                              training=mode == "train").items():
                self._metrics[mode][key].append(value)
        return rewards

    def reward_state(self) -> dict[str, Any]:
        """The state of every reward that keeps one (by reward name), as saved with each checkpoint."""
        return {func.__name__: func.state_dict() for func in self._group_rewards if hasattr(func, "state_dict")}

    def _save_checkpoint(self, model, trial):
        # Written before the Trainer's save, which writes trainer_state.json last: a checkpoint that counts as complete
        # (emoreason.train.common.checkpoint_problem) always holds the schedule, and a save killed part-way does not
        # count whatever it left.
        state = self.reward_state()
        if state and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, REWARD_STATE_FILE), "w") as fh:
                json.dump(state, fh)
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None):
        # Restored here, not in _load_from_checkpoint: transformers does not call that with DeepSpeed (nor FSDP), and
        # every resume passes through train(). ``True`` means the last checkpoint, as the Trainer resolves it.
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)  # None: the Trainer raises
        if resume_from_checkpoint:
            self.load_reward_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval)

    def load_reward_state(self, checkpoint: str | os.PathLike) -> bool:
        """Restore the state of the rewards that keep one from ``checkpoint``; False when there is nothing to restore
        (no such reward, or a checkpoint saved without their state). A checkpoint written before the state file was
        generic holds the reasoning schedule alone (``reward_schedule.json``)."""
        stateful = {func.__name__: func for func in self._group_rewards if hasattr(func, "load_state_dict")}
        if not stateful:
            return False
        path, legacy = os.path.join(checkpoint, REWARD_STATE_FILE), os.path.join(checkpoint, LEGACY_SCHEDULE_FILE)
        if os.path.isfile(path):
            with open(path) as fh:
                saved = json.load(fh)
        elif os.path.isfile(legacy) and "reasoning" in stateful:
            with open(legacy) as fh:
                saved = {"reasoning": {"schedule": json.load(fh)}}
        else:
            logger.warning("%s holds no %s: the rewards' state (%s) starts over", checkpoint, REWARD_STATE_FILE,
                           ", ".join(stateful))
            return False
        for name, func in stateful.items():
            if name in saved:
                func.load_state_dict(saved[name])
            else:
                logger.warning("%s holds no state for the %r reward: it starts over", checkpoint, name)
        logger.info("reward state restored: %s", saved)
        return True
