"""Text warm-up of the backbone LLM on a teacher's chats: what makes a random (tiny) LLM able to act as the `self` teacher.

    emoreason datagen ... --teacher template --out runs/datagen        # writes runs/datagen/teacher_chats.jsonl
    accelerate launch -m emoreason.train.warmup --config recipes/tiny-cpu/warmup.yaml \\
        --model_name_or_path runs/tiny-model --train_records runs/datagen/teacher_chats.jsonl --output_dir runs/warm

A real backbone (Qwen2.5-7B-Instruct, Llama-3.1-8B-Instruct) already follows the rationale prompt, so real recipes
skip this stage. The demo's backbone is a random tiny LLM: it cannot write a rationale at all (every sample fails the
format filter), so the `self` teacher path would never produce training data. The warm-up fine-tunes the LLM alone,
text only, on (rationale prompt -> kept rationale) chats of the train split, the lines `emoreason datagen` writes to
``teacher_chats.jsonl``. The loss is on the answer only (TRL's prompt-completion format). The output is a whole
EmoReason checkpoint (towers and projector as they were, the LLM warmed up), usable as the self teacher's model and as
the base of SFT. Test-split chats are refused: the warm-up must not see what evaluation scores.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import set_seed
from trl import SFTConfig, SFTTrainer, TrlParser

from ..modeling import text_only_lm
from .common import (
    EmoReasonModelArguments,
    EmoReasonScriptArguments,
    get_model,
    get_peft_config,
    get_processor,
    resolve_checkpoint,
    run_cli,
    setup_logging,
    train_and_save,
)

logger = logging.getLogger(__name__)
HELD_OUT_SPLITS = ("test",)


@dataclass
class EmoReasonWarmupConfig(SFTConfig):
    """TRL's ``SFTConfig`` plus which split of the chats file to train on."""

    train_split: str = field(default="train", metadata={"help": "chats of this split train ('all': every split but "
                                                                "test)"})

    def __post_init__(self):
        if self.train_split in HELD_OUT_SPLITS:
            raise ValueError(f"warm-up: train_split {self.train_split!r} is held out for evaluation")
        super().__post_init__()


def load_chats(path: str | Path, split: str = "train", max_records: int | None = None) -> list[dict]:
    """Prompt-completion rows from a ``teacher_chats.jsonl`` (one ``{"id", "split", "messages"}`` per line).

    A malformed line is an error naming the file and line; lines of held-out splits are never returned."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"warm-up: chats file {path} not found (emoreason datagen writes teacher_chats.jsonl)")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                chat = json.loads(line)
                messages = chat["messages"]
                roles = [m["role"] for m in messages]
                if not messages or roles[-1] != "assistant" or not all(isinstance(m["content"], str)
                                                                       for m in messages):
                    raise ValueError("messages must end with an assistant turn, every content a string")
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"warm-up: {path}:{number}: not a chat line ({err})") from None
            chat_split = chat.get("split")
            if chat_split in HELD_OUT_SPLITS or (split != "all" and chat_split != split):
                continue
            rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
            if max_records is not None and len(rows) >= max_records:
                break
    if not rows:
        raise ValueError(f"warm-up: no chats of split {split!r} in {path}")
    return rows


def main(script_args: EmoReasonScriptArguments, training_args: EmoReasonWarmupConfig,
         model_args: EmoReasonModelArguments, recipe: str | None = None) -> dict[str, Any]:
    import datasets

    # seed
    set_seed(training_args.seed)
    # logging
    setup_logging(training_args, script_args, model_args, training_args)
    # resume (checkpoints hold the LLM alone, as the trainer sees it; the final save is the whole model)
    checkpoint = resolve_checkpoint(training_args)
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    # data
    train = datasets.Dataset.from_list(load_chats(script_args.train_records, training_args.train_split,
                                                  script_args.max_train_records))
    # model: the composite's LLM, trained as a plain causal LM
    processor = get_processor(model_args)
    tokenizer = processor.tokenizer
    if not tokenizer.chat_template:
        tokenizer.chat_template = processor.chat_template
    composite = get_model(model_args, processor)
    lm = text_only_lm(composite)
    # trainer
    trainer = SFTTrainer(model=lm, args=training_args, train_dataset=train, processing_class=tokenizer,
                         peft_config=get_peft_config(model_args))

    def save_whole_model(output_dir: str) -> None:
        if hasattr(trainer.model, "merge_and_unload"):  # LoRA: fold the adapter into the shared LLM modules
            trainer.model.merge_and_unload()
        if trainer.accelerator.is_main_process:
            composite.save_pretrained(output_dir, safe_serialization=True)

    # train, save, card
    return train_and_save(trainer, processor, "warmup", script_args, training_args, model_args, checkpoint, recipe,
                          details={"train_split": training_args.train_split}, save_model=save_whole_model)


def make_parser() -> TrlParser:
    return TrlParser((EmoReasonScriptArguments, EmoReasonWarmupConfig, EmoReasonModelArguments))


def cli(argv: list[str] | None = None) -> int:
    return run_cli(make_parser(), main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
