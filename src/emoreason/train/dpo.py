"""DPO on grounded vs. flawed rationales: `accelerate launch ... -m emoreason.train.dpo --config recipes/<model>/dpo.yaml`.

``train_records`` is a pairs file from the data stage (``pairs.jsonl``): each record's ``response`` is the chosen
rationale and ``meta["rejected"]`` a list of ``{"text", "kind"}`` (kinds: ``hallucinated_cue``, ``wrong_emotion``,
``spurious_cue``). Every (chosen, rejected) combination becomes one pair, weighted by ``rejected_kind_weights``;
:class:`~emoreason.train.dpo_trainer.AudioDPOTrainer` trains TRL's DPO loss with the clip in every forward pass and,
with ``text_prior_gamma > 0``, the text-prior debiasing term. Same ``main`` order as every method: seed, logging,
resume, data, model, trainer, train, save, card.
"""

from __future__ import annotations

import json
import logging
import random
import sys
from dataclasses import dataclass, field
from typing import Any

import transformers
from trl import DPOConfig, TrlParser

from ..data.conversation import INSTRUCTION_POOLS, choose_instruction
from ..data.schema import read_records, resolve_under_root
from .common import (
    EmoReasonModelArguments,
    EmoReasonScriptArguments,
    get_datasets,
    get_model,
    get_peft_config,
    get_processor,
    resolve_checkpoint,
    run_cli,
    setup_logging,
    train_and_save,
)

logger = logging.getLogger(__name__)

REJECTED_KINDS = ("hallucinated_cue", "wrong_emotion", "spurious_cue")


@dataclass
class EmoReasonDPOConfig(DPOConfig):
    """TRL's DPO config plus how pairs are built and the text-prior debiasing term."""

    rejected_kind_weights: dict | str | None = field(
        default=None,
        metadata={"help": "weight of a pair by its rejected response's kind, e.g. {hallucinated_cue: 1.0, "
                          "wrong_emotion: 0.5, spurious_cue: 1.0}; kinds not listed weigh 1 (JSON on the command line)"},
    )
    max_rejected_per_chosen: int | None = field(
        default=None, metadata={"help": "use at most this many rejected responses per chosen one (in file order)"}
    )
    text_prior_gamma: float = field(
        default=0.0,
        metadata={"help": "margin reduced by gamma * (log p_text(chosen) - log p_text(rejected)); 0 turns it off"},
    )
    system_prompt: str | None = field(default=None, metadata={"help": "optional system turn before each prompt"})
    train_split: str = field(default="train", metadata={"help": "records of this split train ('all': every record)"})
    eval_split: str = field(default="validation", metadata={"help": "split of train_records to evaluate on (a "
                                                                   "separate eval_records file is taken whole)"})

    def __post_init__(self):
        if isinstance(self.rejected_kind_weights, str):
            text = self.rejected_kind_weights.strip()
            self.rejected_kind_weights = json.loads(text) if text else None
        for kind, weight in (self.rejected_kind_weights or {}).items():
            if not isinstance(weight, (int, float)) or weight < 0:
                raise ValueError(f"rejected_kind_weights: weight of {kind!r} must be a number >= 0, got {weight!r}")
        if self.text_prior_gamma < 0:
            raise ValueError(f"text_prior_gamma must be >= 0, got {self.text_prior_gamma}")
        # The collator reads raw columns (audio, instruction, chosen, rejected, pair_weight).
        self.remove_unused_columns = False
        super().__post_init__()


# -- data -----------------------------------------------------------------------------------------------------------
def load_pairs(path: str, data_root: str, split: str | None = "train", kind_weights: dict[str, float] | None = None,
               max_rejected: int | None = None, seed: int = 0, max_records: int | None = None) -> list[dict[str, Any]]:
    """One row per (chosen, rejected) of every pairs record of ``split``; ``pair_weight`` from the rejected kind.

    Audio paths are checked to stay under ``data_root`` here, so a bad manifest fails before training starts.
    """
    rng = random.Random(seed)
    pool = INSTRUCTION_POOLS["emotion_reasoning"]
    kind_weights = dict(kind_weights or {})
    rows, records = [], 0
    for record in read_records(path):
        if split is not None and record.split != split:
            continue
        rejected = record.meta.get("rejected") or []
        if isinstance(rejected, (str, dict)):
            rejected = [rejected]
        if not record.response or not rejected:
            continue
        resolve_under_root(record.audio, data_root, record=record.id)
        instruction = choose_instruction(record, "emotion_reasoning", pool, rng)
        for i, item in enumerate(rejected[:max_rejected] if max_rejected else rejected):
            text, kind = (item, "unknown") if isinstance(item, str) else (item.get("text"), item.get("kind", "unknown"))
            if not text:
                raise ValueError(f"{path}: record {record.id}: rejected[{i}] has no text")
            weight = float(kind_weights.get(kind, 1.0))
            if weight == 0:
                continue
            rows.append({
                "id": f"{record.id}:{i}", "clip_id": record.id, "audio": record.audio,
                "duration": float(record.duration), "instruction": instruction, "context": list(record.context),
                "chosen": record.response, "rejected": text, "kind": kind, "pair_weight": weight,
            })
        records += 1
        if max_records is not None and records >= max_records:
            break
    if not rows:
        raise ValueError(f"{path}: no record of split {split!r} with a response and meta.rejected (the pairs file "
                         "that `emoreason datagen` writes)")
    return rows


def get_dataset(script_args: EmoReasonScriptArguments, training_args: EmoReasonDPOConfig):
    options = dict(kind_weights=training_args.rejected_kind_weights,
                   max_rejected=training_args.max_rejected_per_chosen, seed=training_args.seed)
    return get_datasets(script_args, training_args, lambda path, split, limit: load_pairs(
        path, script_args.data_root, split, max_records=limit, **options))


# -- entry point ----------------------------------------------------------------------------------------------------
def main(script_args: EmoReasonScriptArguments, training_args: EmoReasonDPOConfig,
         model_args: EmoReasonModelArguments, recipe: str | None = None) -> dict[str, Any]:
    from .dpo_trainer import AudioDPOTrainer

    # seed
    transformers.set_seed(training_args.seed)
    # logging
    setup_logging(training_args, script_args, model_args, training_args)
    # resume
    checkpoint = resolve_checkpoint(training_args)
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    # data
    train_dataset, eval_dataset = get_dataset(script_args, training_args)
    # model
    processor = get_processor(model_args)
    model = get_model(model_args, processor)
    peft_config = None if hasattr(model, "peft_config") else get_peft_config(model_args)
    # trainer
    trainer = AudioDPOTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=peft_config,
        data_root=script_args.data_root,
    )
    # train, save, card
    details = {"beta": training_args.beta, "loss_type": training_args.loss_type,
               "text_prior_gamma": training_args.text_prior_gamma,
               "rejected_kind_weights": training_args.rejected_kind_weights}
    return train_and_save(trainer, processor, "dpo", script_args, training_args, model_args, checkpoint, recipe,
                          details=details)


def make_parser() -> TrlParser:
    return TrlParser((EmoReasonScriptArguments, EmoReasonDPOConfig, EmoReasonModelArguments))


def cli(argv: list[str] | None = None) -> int:
    return run_cli(make_parser(), main, argv)


if __name__ == "__main__":
    sys.exit(cli())
