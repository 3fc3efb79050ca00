"""GRPO for emotion reasoning: `accelerate launch ... -m emoreason.train.grpo --config recipes/<model>/grpo.yaml`.

Start from an SFT checkpoint (adapter folder or merged model) in ``model_name_or_path``. Each training record (a clip
with its consensus label, annotator distribution and measured cues) becomes one prompt; the policy samples
``num_generations`` rationales per prompt, the rewards named in ``reward_funcs`` score them (weights in TRL's
``reward_weights``), and :class:`~emoreason.train.grpo_trainer.AudioGRPOTrainer` optimises TRL's GRPO loss with the
audio in every pass. Same ``main`` order as every method: seed, logging, resume, data, model, trainer, train, save, card.
"""

from __future__ import annotations

import json
import logging
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import transformers
from trl import GRPOConfig, TrlParser

from ..data.conversation import INSTRUCTION_POOLS, audio_placeholder, choose_instruction, record_conversation
from ..data.labels import consensus_label
from ..data.schema import EmotionRecord, read_records
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
from .rewards import REWARDS, get_reward_funcs, probe_reward_funcs

logger = logging.getLogger(__name__)


@dataclass
class EmoReasonGRPOConfig(GRPOConfig):
    """TRL's GRPO config plus which rewards to use (``reward_weights`` is TRL's own field, one weight per reward)."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["format", "accuracy"],
        metadata={"help": f"rewards by name, from: {', '.join(REWARDS)}"},
    )
    reward_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "options per reward, e.g. {reasoning: {judge: openai, judge_options: {...}, threshold: 0.5}}"
                          " (a JSON string on the command line)"},
    )
    system_prompt: str | None = field(default=None, metadata={"help": "optional system turn before each prompt"})
    train_split: str = field(default="train", metadata={"help": "records of this split train ('all': every record)"})
    eval_split: str = field(default="validation", metadata={"help": "split of train_records to evaluate on (a "
                                                                   "separate eval_records file is taken whole)"})

    def __post_init__(self):
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [n.strip() for n in self.reward_funcs.split(",") if n.strip()]
        if isinstance(self.reward_kwargs, str):
            self.reward_kwargs = json.loads(self.reward_kwargs) if self.reward_kwargs.strip() else None
        unknown = [n for n in self.reward_funcs if n not in REWARDS]
        if unknown:
            raise ValueError(f"reward_funcs: unknown reward(s) {unknown}; known: {', '.join(REWARDS)}")
        super().__post_init__()
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} "
                             f"reward_funcs {self.reward_funcs}")


# -- data -----------------------------------------------------------------------------------------------------------
def record_to_example(record: EmotionRecord, data_root: str | Path, instruction: str,
                      system_prompt: str | None = None) -> dict[str, Any]:
    """One GRPO row: the prompt (the shared conversation, the clip's path inside its audio part) and the reward
    columns. ``distribution`` and ``cues`` are JSON text so Arrow keeps each record's own keys.
    """
    audio = audio_placeholder(record.audio_path(data_root))
    return {
        "prompt": record_conversation(record, instruction, system_prompt=system_prompt, audio=audio),
        "id": record.id,
        "label": record.label or consensus_label(record.distribution) or "",
        "distribution": json.dumps(record.distribution),
        "cues": json.dumps(record.cues),
        "transcript": record.transcript or "",
    }


def load_examples(path: str, data_root: str, split: str | None, system_prompt: str | None = None, seed: int = 0,
                  max_records: int | None = None) -> list[dict[str, Any]]:
    """Rows of every record of ``split`` that has something to reward (a label or an annotator distribution).

    A record's own instruction is kept; others draw one from the emotion-reasoning pool (seeded)."""
    rng = random.Random(seed)
    pool = INSTRUCTION_POOLS["emotion_reasoning"]
    rows = []
    for record in read_records(path):
        if split is not None and record.split != split:
            continue
        if not (record.label or record.distribution):
            continue
        instruction = choose_instruction(record, "emotion_reasoning", pool, rng)
        rows.append(record_to_example(record, data_root, instruction, system_prompt))
        if max_records is not None and len(rows) >= max_records:
            break
    if not rows:
        raise ValueError(f"{path}: no record of split {split!r} with a label or a distribution to reward")
    return rows


def get_dataset(script_args: EmoReasonScriptArguments, training_args: EmoReasonGRPOConfig):
    return get_datasets(script_args, training_args, lambda path, split, limit: load_examples(
        path, script_args.data_root, split, training_args.system_prompt, training_args.seed, limit))


# -- entry point ----------------------------------------------------------------------------------------------------
def main(script_args: EmoReasonScriptArguments, training_args: EmoReasonGRPOConfig,
         model_args: EmoReasonModelArguments, recipe: str | None = None) -> dict[str, Any]:
    from .grpo_trainer import AudioGRPOTrainer

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
    # rewards: a remote judge that does not answer stops the run here, before the model loads
    reward_funcs = get_reward_funcs(training_args.reward_funcs, training_args.reward_kwargs)
    probe_reward_funcs(reward_funcs)
    # model
    processor = get_processor(model_args)
    model = get_model(model_args, processor)
    peft_config = None if hasattr(model, "peft_config") else get_peft_config(model_args)
    # trainer
    trainer = AudioGRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        peft_config=peft_config,
    )
    # train, save, card
    details = {"reward_funcs": list(training_args.reward_funcs), "reward_weights": training_args.reward_weights,
               "num_generations": training_args.num_generations, "beta": training_args.beta}
    try:
        return train_and_save(trainer, processor, "grpo", script_args, training_args, model_args, checkpoint,
                              recipe, details=details)
    finally:
        # A colocated vLLM engine leaves while the process group still exists (shutdown_distributed tears it down
        # next); closed later, each rank's engine reports "Invalid process group specified" at exit.
        engine = getattr(trainer, "vllm_generation", None)
        if engine is not None and hasattr(engine, "close"):
            engine.close()


def make_parser() -> TrlParser:
    return TrlParser((EmoReasonScriptArguments, EmoReasonGRPOConfig, EmoReasonModelArguments))


def cli(argv: list[str] | None = None) -> int:
    return run_cli(make_parser(), main, argv)


if __name__ == "__main__":
    sys.exit(cli())
