"""Supervised fine-tuning of the dual-encoder audio LLM with TRL's ``SFTTrainer``.

    accelerate launch --config_file accelerate_configs/ddp.yaml -m emoreason.train.sft \\
        --config recipes/qwen2.5-7b-whisper-wavlm/sft.yaml [--field value ...]
    emoreason train sft --config recipes/tiny-cpu/sft.yaml [--accelerate-config FILE] [--field value ...]

Command-line flags override the recipe. ``main`` follows the order every method shares: seed, logging, resume, data,
model, trainer, train, save, card. Rows come from :mod:`emoreason.train.tasks` (one or many tasks, one task per
batch), batches from :class:`emoreason.train.collators.SFTCollator` (loss on the response only), tower outputs from the
feature cache when one matches the encoders (:mod:`emoreason.train.feature_cache`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed
from trl import SFTConfig, SFTTrainer, TrlParser

from .collators import IGNORE_INDEX, FeatureAugment, SFTCollator
from ..data.labels import EMOTIONS
from ..modeling.loading import checkpoint_base
from .common import (
    EmoReasonModelArguments,
    EmoReasonScriptArguments,
    get_datasets,
    get_model,
    get_peft_config,
    get_processor,
    name_base,
    resolve_checkpoint,
    run_cli,
    setup_logging,
    split_filter,
    train_and_save,
)
from .tasks import TaskAlternatingSampler, build_task_examples, label_only_response, parse_task_specs

logger = logging.getLogger(__name__)

@dataclass
class EmoReasonSFTConfig(SFTConfig):
    """TRL's ``SFTConfig`` plus the multitask schedule, the feature cache and audio-specific optimisation knobs."""

    tasks: dict | str | None = field(
        default=None,
        metadata={"help": "tasks to train: {name: {weight, records, instructions}} (YAML), a JSON string, or "
                          "'emotion_label:2,transcription'. Default: emotion_reasoning"},
    )
    task_schedule: str = field(default="round_robin", metadata={"help": "round_robin | weighted (one task per batch)"})
    length_group_size: int = field(
        default=16, metadata={"help": "batches per mega-batch sorted by clip duration (1: no length grouping)"}
    )
    pack_batches: bool = field(
        default=False,
        metadata={"help": "padding-free batches: each batch's examples in one row, position ids restarting per example "
                          "(emoreason.train.collators.SFTCollator(packing=True); TRL's own packing/padding_free act on "
                          "datasets TRL tokenizes, not on ours). Attention stays within each example with sdpa and "
                          "eager (a block-diagonal mask: no compute saved on attention) and flash-attention (varlen); "
                          "length_group_size still orders the batches"},
    )
    train_split: str = field(default="train", metadata={"help": "records of this split train ('all': every record)"})
    eval_split: str = field(default="validation", metadata={"help": "records of this split evaluate"})
    system_prompt: str | None = field(default=None, metadata={"help": "system message prepended to every chat"})
    feature_cache_dir: str | None = field(
        default=None, metadata={"help": "folder written by `emoreason cache-features` (frozen encoders only)"}
    )
    projector_lr_multiplier: float = field(
        default=1.0, metadata={"help": "the projector's learning rate is learning_rate times this"}
    )
    feature_norm_clips: int = field(
        default=256,
        metadata={"help": "training clips to measure the projector's feature normalisation on (feature_norm: "
                          "global_mvn) when the model has no statistics yet; 0: do not measure"},
    )
    train_language_model: bool = field(
        default=True, metadata={"help": "without LoRA: train the LM in full (True) or freeze it (False)"}
    )
    label_accuracy_split: str | None = field(
        default=None,
        metadata={"help": "after training, score emotion-label accuracy on this split (label log-likelihood "
                          "comparison), with the audio and with silence; written to all_results.json"},
    )
    feature_augment: dict | str | None = field(
        default=None,
        metadata={"help": "training-time augmentation of cached tower states, drawn afresh every batch (see "
                          "emoreason.train.collators.FeatureAugment): {crop: min fraction of frames kept, time_mask: "
                          "fraction of frames masked, mask_span: frames per masked span, noise: std units, "
                          "content_dropout: probability}; YAML or a JSON string. Needs feature_cache_dir"},
    )
    resample_instructions: bool = field(
        default=False,
        metadata={"help": "draw each row's instruction afresh from its task's pool every batch (rows whose "
                          "instruction the record wrote itself, and prosody rows, keep theirs)"},
    )
    # Audio batches are built by our collator from raw rows: TRL must neither drop columns nor tokenize.
    remove_unused_columns: bool = False
    dataset_kwargs: dict[str, Any] | None = field(default_factory=lambda: {"skip_prepare_dataset": True})

    def __post_init__(self):
        if isinstance(self.tasks, str) and self.tasks.strip().startswith(("{", "[")):
            self.tasks = json.loads(self.tasks)
        self.dataset_kwargs = {**(self.dataset_kwargs or {}), "skip_prepare_dataset": True}
        self.remove_unused_columns = False
        if self.task_schedule not in ("round_robin", "weighted"):
            raise ValueError(f"task_schedule must be round_robin or weighted, got {self.task_schedule!r}")
        if self.feature_norm_clips < 0:
            raise ValueError("feature_norm_clips must be >= 0")
        if self.projector_lr_multiplier <= 0:
            raise ValueError("projector_lr_multiplier must be > 0")
        self.feature_augmentation()  # a bad feature_augment fails here, before any model is loaded
        super().__post_init__()

    def feature_augmentation(self) -> FeatureAugment | None:
        """``feature_augment`` as a validated :class:`FeatureAugment` (seeded with ``seed``), or None when unset."""
        spec = self.feature_augment
        if isinstance(spec, str):
            text = spec.strip()
            if text.lower() in ("", "none", "null"):
                return None
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"feature_augment must be a mapping (YAML) or a JSON object, got {text!r}") from err
        if spec is None:
            return None
        if not isinstance(spec, dict):
            raise ValueError(f"feature_augment must be a mapping, got {spec!r}")
        known = {"crop", "time_mask", "mask_span", "noise", "content_dropout"}
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"feature_augment: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
        for key, value in spec.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"feature_augment: {key} must be a number, got {value!r}")
        return FeatureAugment(**spec, seed=self.seed)


class EmoReasonSFTTrainer(SFTTrainer):
    """``SFTTrainer`` with one task per batch (task-alternating, length-grouped sampler) and a projector LR group."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        specs = parse_task_specs(self.args.tasks)
        return TaskAlternatingSampler(
            dataset["task"],
            batch_size=self._train_batch_size,
            weights={s.name: s.weight for s in specs if s.name in set(dataset["task"])},
            schedule=self.args.task_schedule,
            lengths=dataset["duration"] if self.args.length_group_size > 1 else None,
            length_group_size=self.args.length_group_size,
            blocks_per_step=self.args.world_size,
            seed=self.args.seed,
        )

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        multiplier = self.args.projector_lr_multiplier
        if multiplier == 1.0 or getattr(self, "_projector_group_done", False):
            return optimizer
        opt_model = self.model if model is None else model
        projector = {id(p) for n, p in opt_model.named_parameters() if ".projector." in f".{n}" and p.requires_grad}
        new_groups = []
        for group in optimizer.param_groups:
            moved = [p for p in group["params"] if id(p) in projector]
            if moved:
                group["params"] = [p for p in group["params"] if id(p) not in projector]
                new_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": moved,
                                   "lr": group["lr"] * multiplier})
        for group in new_groups:
            optimizer.add_param_group(group)
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        self._projector_group_done = True
        return optimizer


# -- helpers --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def outside_zero3_init():
    """Build models without DeepSpeed's ``zero.Init`` (it breaks WavLM's weight-norm parametrisation); ZeRO-3 still
    partitions the finished model when the trainer wraps it."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def instruction_pools(specs) -> dict[str, list[str]]:
    """{task: instruction pool} for the tasks whose pool is named after them (all but prosody)."""
    pools = {}
    for spec in specs:
        with contextlib.suppress(KeyError):
            pools[spec.name] = list(spec.pool(spec.name))
    return pools


@torch.no_grad()
def label_accuracy(model, processor, rows: Sequence[dict], data_root: str | Path, labels: Sequence[str] | None = None,
                   silence: bool = False, batch_size: int = 8, system_prompt: str | None = None) -> dict[str, Any]:
    """Emotion-label accuracy by constrained comparison: for each row, the summed log-likelihood of every candidate
    target ``<answer>label</answer><end of turn>`` given the clip and the instruction; the most likely label is the
    prediction. No sampling, no parsing, so the number measures what the model knows, not its formatting.

    ``silence=True`` replaces every clip by silence of one fixed length (the rows' mean duration), the no-audio
    control: nothing about the clip, not even its duration, reaches the model."""
    labels = list(labels or sorted({r["label"] for r in rows if r.get("label")}))
    silence_seconds = sum(r["duration"] for r in rows) / max(1, len(rows)) if silence else None
    collator = SFTCollator(processor, data_root, system_prompt=system_prompt, silence_seconds=silence_seconds)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, predictions = 0, []
    scored = [r for r in rows if r.get("label") in labels]
    for start in range(0, len(scored), batch_size):
        chunk = scored[start : start + batch_size]
        batch = collator([{**r, "response": label_only_response(lab)} for r in chunk for lab in labels])
        batch = {k: v.to(device) for k, v in batch.items()}
        target = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()
        target = target[:, 1:]
        mask = target != IGNORE_INDEX
        logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores = (logp * mask).sum(-1).view(len(chunk), len(labels))
        for row, best in zip(chunk, scores.argmax(-1).tolist()):
            predictions.append(labels[best])
            correct += labels[best] == row["label"]
    model.train(was_training)
    return {"accuracy": correct / max(1, len(scored)), "n": len(scored), "labels": labels,
            "predictions": predictions}


# -- main -----------------------------------------------------------------------------------------------------
def main(script_args: EmoReasonScriptArguments, training_args: EmoReasonSFTConfig,
         model_args: EmoReasonModelArguments, recipe: str | None = None) -> dict[str, Any]:
    # seed, logging
    set_seed(training_args.seed)
    setup_logging(training_args)
    # resume
    checkpoint = resolve_checkpoint(training_args)
    if checkpoint:
        logger.info("resuming from %s", checkpoint)

    # data
    specs = parse_task_specs(training_args.tasks)
    train_dataset, eval_dataset = get_datasets(script_args, training_args, lambda path, split, limit: (
        build_task_examples(specs, path, split=split, seed=training_args.seed, max_records=limit)))

    # model
    processor = get_processor(model_args)
    with outside_zero3_init():
        model = get_model(model_args, processor)
    if model_args.model_name_or_path:
        name_base(model, checkpoint_base(model_args.model_name_or_path))
    else:
        # An adapter must name a base it can be loaded onto: save the freshly assembled model once.
        base_dir = Path(training_args.output_dir) / "base"
        if training_args.process_index == 0 and not (base_dir / "config.json").exists():
            model.save_pretrained(base_dir)
            processor.save_pretrained(base_dir)
        name_base(model, base_dir)
    if training_args.world_size > 1 and model_args.train_paralinguistic_encoder:
        # LayerDrop skips different layers on different ranks: DDP then waits for gradients that never come.
        model.get_audio_encoder().paralinguistic_encoder.config.layerdrop = 0.0
    peft_config = get_peft_config(model_args)
    if peft_config is None and not training_args.train_language_model:
        model.model.language_model.requires_grad_(False)
        model.lm_head.requires_grad_(False)

    feature_cache = None
    if training_args.feature_cache_dir:
        from .feature_cache import FeatureCache

        feature_cache = FeatureCache.for_model(training_args.feature_cache_dir, model, processor)
    projector, norm_summary = model.get_audio_encoder().projector, None
    if training_args.feature_norm_clips > 0 and projector.feature_norm == "global_mvn":
        if projector.feature_norm_fitted:
            logger.info("feature normalisation: keeping the statistics the model has (%d frames)",
                        int(projector.feature_norm_frames))
        elif checkpoint is None:  # a resumed run gets them back from its checkpoint
            from .feature_norm import fit_feature_norm_once

            # measured once, by the main process on its accelerator, and broadcast to the other ranks; the rows are
            # read lazily, up to feature_norm_clips clips
            norm_summary = fit_feature_norm_once(model, processor, train_dataset, script_args.data_root,
                                                 feature_cache=feature_cache,
                                                 max_clips=training_args.feature_norm_clips,
                                                 show_progress=not training_args.disable_tqdm,
                                                 device=training_args.device)
    feature_augment = training_args.feature_augmentation()
    if feature_augment is not None and feature_cache is None:
        # The augmentation acts on cached tower states only (a recipe may set it and still run without a cache, as
        # every batch computed live is): say so once and train without it.
        logger.warning("feature_augment %s is off: it works on cached tower states and this run has no "
                       "feature_cache_dir (run `emoreason cache-features` and set it to augment)", feature_augment)
        feature_augment = None
    collator = SFTCollator(processor, script_args.data_root, max_length=training_args.max_length,
                           system_prompt=training_args.system_prompt, feature_cache=feature_cache,
                           feature_augment=feature_augment, seed=training_args.seed,
                           instruction_pools=instruction_pools(specs) if training_args.resample_instructions else None,
                           packing=training_args.pack_batches)

    # trainer
    trainer = EmoReasonSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
        peft_config=peft_config,
    )

    # train, save, card (the tail every method shares), with the label-accuracy scoring SFT adds
    def sft_metrics(trainer) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if norm_summary:
            metrics["feature_norm_clips"] = norm_summary["clips"]
        if feature_cache is not None:
            metrics["feature_cache_hit_batches"] = collator.cache_hits
            metrics["feature_cache_miss_batches"] = collator.cache_misses
        # Every rank scores: under ZeRO-3 a forward pass gathers parameters from all ranks, so a main-process-only
        # pass would hang.
        if training_args.label_accuracy_split:
            from ..data.schema import read_records
            from .tasks import TaskSpec

            records = read_records(script_args.eval_records or script_args.train_records)
            rows = build_task_examples([TaskSpec("emotion_label")], records,
                                       split=split_filter(training_args.label_accuracy_split), seed=training_args.seed)
            labels = sorted({r["label"] for r in build_task_examples(
                [TaskSpec("emotion_label")], records, split=None, seed=0)} & set(EMOTIONS))
            scoring_model = trainer.accelerator.unwrap_model(trainer.model)
            for name, silence in (("label_accuracy", False), ("label_accuracy_silence", True)):
                scored = label_accuracy(scoring_model, processor, rows, script_args.data_root, labels,
                                        silence=silence, system_prompt=training_args.system_prompt)
                metrics[name] = scored["accuracy"]
                logger.info("%s on %s (%d clips): %.3f", name, training_args.label_accuracy_split, scored["n"],
                            scored["accuracy"])
        return metrics

    details = {"tasks": [s.name for s in specs], "task_schedule": training_args.task_schedule}
    return train_and_save(trainer, processor, "sft", script_args, training_args, model_args, checkpoint, recipe,
                          details=details, extra_metrics=sft_metrics)


def make_parser() -> TrlParser:
    return TrlParser((EmoReasonScriptArguments, EmoReasonSFTConfig, EmoReasonModelArguments))


def cli(argv: list[str] | None = None) -> int:
    return run_cli(make_parser(), main, argv)


if __name__ == "__main__":
    sys.exit(cli())
