"""Audio-aware DPO: TRL's ``DPOTrainer`` with our preference collator, per-pair weights and a text-prior term.

- :class:`PreferenceCollator` renders each pair like the SFT collator renders an example (same chat, same `<audio>`
  expansion, same audio loading or feature cache) and returns TRL's preference batch: chosen rows, then rejected
  rows, with the audio duplicated so that row i of every tensor belongs together. Every key it returns except
  ``completion_mask`` and ``pair_weight`` goes to ``model(**batch)``.
- Several rejected responses per chosen one become several pairs (:func:`emoreason.train.dpo.load_pairs`); each
  pair's ``pair_weight`` (by the rejected response's kind) scales that pair's gradient: the update is that of
  ``mean_i(w_i * loss_i)`` (the logged loss stays TRL's unweighted mean).
- ``text_prior_gamma > 0`` debiases against answers the text alone already prefers: the preference margin
  ``beta * (chosen log-ratio - rejected log-ratio)`` is reduced by ``gamma * (log p_text(chosen) - log p_text(rejected))``,
  where ``p_text`` is the current policy with the clip removed (audio positions masked out, no audio tensors), taken
  without gradient. It enters TRL's loss as a shift of the reference log-probs by ``gamma / beta * log p_text``,
  which for the sigmoid loss is exactly that margin reduction.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from trl import DPOTrainer

from .collators import SFTCollator
from .grpo_trainer import pin_reference_attention, sync_reference_adapter

logger = logging.getLogger(__name__)

NON_MODEL_KEYS = ("completion_mask", "pair_weight", "ref_chosen_logps", "ref_rejected_logps")
REQUIRED_COLUMNS = ("audio", "instruction", "chosen", "rejected")


class PreferenceCollator(SFTCollator):
    """Rows with ``audio``, ``instruction``, ``chosen``, ``rejected`` (and ``pair_weight``) -> TRL's preference batch
    (``input_ids``, ``attention_mask``, ``completion_mask``: chosen rows then rejected rows) + duplicated audio."""

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        num_samples, audio = self.audio_inputs(examples)
        token = self.processor.audio_token
        prompts, chosen, rejected = [], [], []
        for example, n in zip(examples, num_samples):
            prompt, chosen_text = self.render({**example, "response": example["chosen"]})
            _, rejected_text = self.render({**example, "response": example["rejected"]})
            if prompt.count(token) != 1:
                raise ValueError(f"row {example.get('id')}: the prompt must hold exactly one {token}")
            prompts.append(prompt.replace(token, token * self.processor.num_audio_tokens(n)))
            chosen.append(chosen_text)
            rejected.append(rejected_text)
        encode = lambda texts: self.tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
        prompt_ids, chosen_ids, rejected_ids = encode(prompts), encode(chosen), encode(rejected)
        rows, completion_masks = [], []
        for completions in (chosen_ids, rejected_ids):
            for example, p, c in zip(examples, prompt_ids, completions):
                if self.max_length is not None:
                    if len(p) >= self.max_length:
                        raise ValueError(f"row {example.get('id')}: the prompt alone is {len(p)} tokens (audio "
                                         f"included), max_length is {self.max_length}")
                    c = c[: self.max_length - len(p)]
                rows.append(p + c)
                completion_masks.append([0] * len(p) + [1] * len(c))
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, mask) in enumerate(zip(rows, completion_masks)):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
            completion_mask[i, : len(mask)] = torch.tensor(mask)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
        batch.update({k: torch.cat([v, v], dim=0) for k, v in audio.items()})  # chosen rows, then rejected rows
        batch["pair_weight"] = torch.tensor([float(e.get("pair_weight", 1.0) or 0.0) for e in examples])
        return batch


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies each row's gradient by its weight."""

    @staticmethod
    def forward(ctx, x, row_scale):
        ctx.save_for_backward(row_scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (row_scale,) = ctx.saved_tensors
        return grad * row_scale.view(-1, *([1] * (grad.dim() - 1))).to(grad.dtype), None


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}


class AudioDPOTrainer(DPOTrainer):
    """``DPOTrainer`` for the audio model (see the module docstring). ``text_prior_gamma`` is read from ``args``."""

    def __init__(self, model, ref_model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, data_root: str = ".", **kwargs):
        if processing_class is None:
            raise ValueError("AudioDPOTrainer needs the EmoReasonProcessor as processing_class")
        if data_collator is None:
            data_collator = PreferenceCollator(processing_class, data_root, max_length=args.max_length,
                                               system_prompt=getattr(args, "system_prompt", None))
        if args is not None:
            args.remove_unused_columns = False  # the collator reads the raw columns
            if ref_model is None and not isinstance(model, str):
                pin_reference_attention(model, args)
        self.text_prior_gamma = float(getattr(args, "text_prior_gamma", 0.0) or 0.0)
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         **kwargs)
        sync_reference_adapter(self.model)  # TRL's "ref" adapter copy misses the projector's normalisation buffers
        self._audio_token_id = processing_class.audio_token_id

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Rows stay raw: the collator renders, expands `<audio>` and tokenizes per batch (clip lengths vary)."""
        columns = set(getattr(dataset, "column_names", None) or next(iter(dataset)).keys())
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"{dataset_name} dataset lacks column(s) {missing}; rows come from "
                             "emoreason.train.dpo.load_pairs (audio, instruction, chosen, rejected, pair_weight)")
        return dataset

    def compute_ref_log_probs(self, model, inputs):
        return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k != "pair_weight"})

    @torch.no_grad()
    def text_only_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed completion log-probs of chosen and rejected rows with the clip removed: no audio tensors, and the
        `<audio>` positions masked out of attention."""
        input_ids, completion_mask = inputs["input_ids"], inputs["completion_mask"]
        attention_mask = inputs["attention_mask"] * (input_ids != self._audio_token_id)
        labels = input_ids.masked_fill(completion_mask == 0, -100)
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False,
                        fused_lm_head=True)
        seq_len = completion_mask.size(1) - 1
        logps = (outputs.log_probs[:, -seq_len:] * completion_mask[:, 1:]).sum(dim=1)
        return logps.chunk(2, dim=0)

    @contextlib.contextmanager
    def _pair_weighted_gradients(self, model, weights: torch.Tensor | None):
        if weights is None or bool((weights == 1).all()):
            yield
            return
        row_scale = torch.cat([weights, weights]).float()

        def hook(module, args, output):
            log_probs = getattr(output, "log_probs", None)
            if log_probs is not None and log_probs.requires_grad and log_probs.shape[0] == row_scale.shape[0]:
                output.log_probs = _ScaleGradient.apply(log_probs, row_scale.to(log_probs.device))
            return output

        handle = self.accelerator.unwrap_model(model).register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _reference_from_inputs(self):
        previous = self.precompute_ref_logps
        self.precompute_ref_logps = True
        try:
            yield
        finally:
            self.precompute_ref_logps = previous

    def _compute_loss(self, model, inputs, return_outputs):
        inputs = dict(inputs)
        weights = inputs.pop("pair_weight", None)
        has_audio = "input_features" in inputs or "content_states" in inputs
        if not has_audio and bool((inputs["input_ids"] == self._audio_token_id).any()):
            raise RuntimeError("preference rows hold `<audio>` placeholders but the batch has no audio")
        mode = "train" if self.model.training else "eval"
        reference = contextlib.nullcontext()
        if self.text_prior_gamma:
            if self.precompute_ref_logps:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                ref_model = self.ref_model if self.ref_model is not None else self.model
                ref_chosen, ref_rejected = self.compute_ref_log_probs(ref_model, inputs)
            text_chosen, text_rejected = self.text_only_logps(model, inputs)
            shift = self.text_prior_gamma / self.beta
            inputs["ref_chosen_logps"] = ref_chosen + shift * text_chosen
            inputs["ref_rejected_logps"] = ref_rejected + shift * text_rejected
            reference = self._reference_from_inputs()
        with reference, self._pair_weighted_gradients(model, weights):
            result = super()._compute_loss(model, inputs, return_outputs)
        if self.text_prior_gamma:
            self._report_without_text_prior(mode, text_chosen, text_rejected)
        return result

    def _report_without_text_prior(self, mode: str, text_chosen: torch.Tensor, text_rejected: torch.Tensor) -> None:
        """TRL logged rewards against the shifted reference; report the plain DPO rewards (what the policy learned
        against the reference), and the debiased margin and text-prior margin beside them."""
        metrics = self._metrics[mode]
        gamma = self.text_prior_gamma
        chosen = self.accelerator.gather(text_chosen).mean().item()
        rejected = self.accelerator.gather(text_rejected).mean().item()
        metrics["rewards/debiased_margins"].append(metrics["rewards/margins"][-1])
        metrics["rewards/chosen"][-1] += gamma * chosen
        metrics["rewards/rejected"][-1] += gamma * rejected
        metrics["rewards/margins"][-1] += gamma * (chosen - rejected)
        metrics["text_prior/margin"].append(chosen - rejected)
