"""Pieces every training entry point shares: argument dataclasses (extending TRL's) and the model/processor factories.

Each method's ``main(script_args, training_args, model_args)`` follows the same order: seed, logging, resume, data,
model, trainer, train, save, card. Model loading goes through :func:`get_model`, which takes either a saved EmoReason
checkpoint (``model_name_or_path``) or three pretrained parts (``content_encoder``, ``paralinguistic_encoder``,
``language_model``), so recipes for real models and the tiny test model run the same code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from trl import ModelConfig, ScriptArguments

from ..modeling import EmoReasonForConditionalGeneration, EmoReasonProcessor, build_from_components
from ..data.audio_tokens import DEFAULT_STACK_FACTOR
from ..modeling.fusion import FUSION_MODES
from ..modeling.loading import checkpoint_base, safe_load_kwargs
from ..modeling.lora import language_model_lora_config

logger = logging.getLogger(__name__)


@dataclass
class EmoReasonModelArguments(ModelConfig):
    """TRL's model arguments plus how to assemble the dual-encoder model from parts.

    Set ``model_name_or_path`` to an EmoReason checkpoint (saved model, merged export, or an SFT output with an
    adapter), or leave it empty and name the three parts.
    """

    content_encoder: str | None = field(default=None, metadata={"help": "Whisper checkpoint (e.g. openai/whisper-large-v3)"})
    paralinguistic_encoder: str | None = field(
        default=None, metadata={"help": "WavLM / HuBERT / wav2vec2 checkpoint (e.g. microsoft/wavlm-large)"}
    )
    language_model: str | None = field(default=None, metadata={"help": "causal LM (e.g. Qwen/Qwen2.5-7B-Instruct)"})
    stack_factor: int = field(default=DEFAULT_STACK_FACTOR, metadata={"help": "50 Hz encoder frames per audio token"})
    fusion: str = field(default="concat", metadata={"help": f"fusion mode: {' | '.join(FUSION_MODES)}"})
    projector_hidden_size: int = field(default=0, metadata={"help": "0: the LM's hidden size"})
    train_content_encoder: bool = field(default=False)
    train_paralinguistic_encoder: bool = field(default=False)

    def __post_init__(self):
        super().__post_init__()
        parts = (self.content_encoder, self.paralinguistic_encoder, self.language_model)
        if self.model_name_or_path is None and not all(parts):
            raise ValueError(
                "model: set model_name_or_path to an EmoReason checkpoint, or all three of content_encoder, "
                "paralinguistic_encoder and language_model"
            )
        if self.fusion not in FUSION_MODES:
            raise ValueError(f"model: fusion must be one of {', '.join(FUSION_MODES)}, got {self.fusion!r}")


@dataclass
class EmoReasonScriptArguments(ScriptArguments):
    """Where the records are. ``dataset_name`` (TRL's field) may point at a JSONL/parquet file of records."""

    dataset_name: str | None = field(default=None, metadata={"help": "records file (JSONL or parquet)"})
    train_records: str | None = field(default=None, metadata={"help": "records file for training"})
    eval_records: str | None = field(default=None, metadata={"help": "records file for evaluation"})
    data_root: str = field(default=".", metadata={"help": "audio paths in records are relative to this folder"})
    max_train_records: int | None = field(default=None)

    def __post_init__(self):
        if self.train_records is None:
            self.train_records = self.dataset_name
        if self.train_records is None:
            raise ValueError("data: set train_records (or dataset_name) to a records file")
        if not Path(self.data_root).is_dir():
            raise ValueError(f"data: data_root {self.data_root!r} is not a folder")


def _dtype(name: str | None):
    if name in (None, "auto"):
        return None if name is None else "auto"
    return getattr(torch, name)


def get_processor(model_args: EmoReasonModelArguments) -> EmoReasonProcessor:
    if model_args.model_name_or_path:
        path = model_args.model_name_or_path
        own = Path(path) / "processor_config.json"
        return EmoReasonProcessor.from_pretrained(path if own.is_file() else checkpoint_base(path))
    return EmoReasonProcessor.from_components(
        model_args.content_encoder, model_args.paralinguistic_encoder, model_args.language_model,
        stack_factor=model_args.stack_factor,
    )


def get_model(model_args: EmoReasonModelArguments, processor: EmoReasonProcessor | None = None):
    """Load or assemble the model. An adapter checkpoint is loaded onto its base with the adapter kept trainable.

    ``attn_implementation`` (one name, as recipes give it) reaches every part that has that kernel and eager
    attention the others, on both paths (``modeling.loading.attn_implementation_per_part``)."""
    kwargs = {"dtype": _dtype(model_args.dtype)} if model_args.dtype else {}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.model_name_or_path:
        path = model_args.model_name_or_path
        base = checkpoint_base(path)  # a clear error before any weights load
        model = EmoReasonForConditionalGeneration.from_pretrained(base, **safe_load_kwargs(**kwargs))
        if base != path:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, path, is_trainable=True)
        return model
    model, _ = build_from_components(
        model_args.content_encoder,
        model_args.paralinguistic_encoder,
        model_args.language_model,
        stack_factor=model_args.stack_factor,
        processor=processor,
        fusion=model_args.fusion,
        projector_hidden_size=model_args.projector_hidden_size,
        train_content_encoder=model_args.train_content_encoder,
        train_paralinguistic_encoder=model_args.train_paralinguistic_encoder,
        **kwargs,
    )
    return model


def name_base(model, base_dir: str | os.PathLike) -> None:
    """Record where ``model``'s full weights live, so that an adapter saved from it names its base: PEFT writes
    ``base_model_name_or_path`` from the model's ``name_or_path`` attribute (empty for a model assembled in memory),
    and ``from_pretrained`` of the adapter's folder, GRPO, DPO and ``export`` read it back."""
    path = str(Path(base_dir).resolve())
    model.name_or_path = path
    model.config._name_or_path = path


def split_filter(name: str | None) -> str | None:
    """A split name as the readers take it: ``all`` (or empty) keeps every record."""
    return None if name in (None, "", "all") else name


def get_datasets(script_args: EmoReasonScriptArguments, training_args,
                 rows: Callable[[str, str | None, int | None], list[dict[str, Any]]]):
    """(train, eval or None) datasets, the same way for SFT, GRPO and DPO: ``rows(path, split, max_records)`` reads
    one method's rows (tasks, prompts, pairs). Training reads ``train_records`` of ``train_split``; when the run
    evaluates, a separate ``eval_records`` file is taken whole (it is already the evaluation split), else
    ``train_records`` of ``eval_split``."""
    import datasets

    train = rows(script_args.train_records, split_filter(training_args.train_split), script_args.max_train_records)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        if script_args.eval_records:
            eval_rows = rows(script_args.eval_records, None, None)
        else:
            eval_rows = rows(script_args.train_records, split_filter(training_args.eval_split), None)
        eval_dataset = datasets.Dataset.from_list(eval_rows)
    return datasets.Dataset.from_list(train), eval_dataset


def get_peft_config(model_args: EmoReasonModelArguments):
    """LoRA on the language model only (+ the projector as a saved module), or None when ``use_peft`` is off."""
    if not model_args.use_peft:
        return None
    return language_model_lora_config(
        r=model_args.lora_r,
        alpha=model_args.lora_alpha,
        dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        modules_to_save=model_args.lora_modules_to_save or ["projector"],
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
    )


def setup_logging(training_args, *configs) -> None:
    """Process-aware log levels for us, transformers and datasets; the main process logs the parsed configs."""
    import datasets
    import transformers

    level = training_args.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stdout)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    for config in configs:
        logger.info("%s", config)


WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def checkpoint_problem(path: str | os.PathLike, needs_optimizer: bool = True) -> str | None:
    """Why ``path`` is not a complete Trainer checkpoint, or None when it is.

    The Trainer writes weights, then optimizer/scheduler/RNG state, and ``trainer_state.json`` last, so a save that
    was killed part-way lacks a readable ``trainer_state.json`` (or, earlier, the weights)."""
    import json

    folder = Path(path)
    if not folder.is_dir():
        return "not a folder"
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except FileNotFoundError:
        return "no trainer_state.json (the save did not finish)"
    except ValueError:
        return "trainer_state.json is cut off"
    present = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    deepspeed = (folder / "latest").is_file() and any(folder.glob("global_step*"))  # ZeRO states hold the weights
    if not present and not deepspeed:
        return "no model weights"
    if "model.safetensors.index.json" in present and "model.safetensors" not in present:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        missing = sorted({f for f in index.get("weight_map", {}).values() if not (folder / f).is_file()})
        if missing:
            return f"weight shard(s) missing: {missing[:3]}"
    has_optimizer = (folder / "optimizer.pt").is_file() or deepspeed
    if needs_optimizer and not has_optimizer:
        return "no optimizer state"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike, needs_optimizer: bool = True) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` that is complete; torn ones are skipped with a warning (left in
    place: the Trainer overwrites the folder when it reaches that step again)."""
    import re

    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = sorted(((int(m.group(1)), p) for p in folder.iterdir()
                    if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))), reverse=True)
    for _, path in steps:
        problem = checkpoint_problem(path, needs_optimizer)
        if problem is None:
            return str(path)
        logger.warning("skipping incomplete checkpoint %s: %s", path, problem)
    return None


def resolve_checkpoint(training_args) -> str | None:
    """An explicit ``resume_from_checkpoint`` (a path, or ``true`` for the last one), else the last complete
    checkpoint in ``output_dir`` when there is one (a restarted job continues instead of starting over). A checkpoint
    torn by a kill during its save never counts."""
    needs_optimizer = not getattr(training_args, "save_only_model", False)
    explicit = training_args.resume_from_checkpoint
    last = last_complete_checkpoint(training_args.output_dir, needs_optimizer)
    if explicit in (None, "", "false", "False", False):
        return last
    if explicit in ("true", "True", True):
        if last is None:
            raise ValueError(f"resume_from_checkpoint=true but {training_args.output_dir} holds no complete checkpoint")
        return last
    problem = checkpoint_problem(explicit, needs_optimizer)
    if problem:
        raise ValueError(f"resume_from_checkpoint={explicit} is not a complete checkpoint: {problem}")
    return explicit


TRAINING_INFO_FILE = "emoreason_training.json"


def training_info(method: str, script_args, model_args, metrics: dict[str, Any], recipe: str | None = None,
                  **details: Any) -> dict[str, Any]:
    """What a run was (``emoreason_training.json``; ``emoreason export`` turns it into the model card): the method,
    recipe, data, model, the method's own settings (``details``: tasks, rewards, beta...) and the final metrics."""
    return {
        "method": method,
        "recipe": recipe,
        "train_records": script_args.train_records,
        "data_root": script_args.data_root,
        "model": model_args.model_name_or_path or {
            "content_encoder": model_args.content_encoder,
            "paralinguistic_encoder": model_args.paralinguistic_encoder,
            "language_model": model_args.language_model,
        },
        "use_peft": model_args.use_peft,
        **details,
        "metrics": metrics,
    }


def train_and_save(trainer, processor, method: str, script_args, training_args, model_args, checkpoint: str | None,
                   recipe: str | None = None, details: dict[str, Any] | None = None,
                   extra_metrics: Callable[[Any], dict[str, Any]] | None = None,
                   save_model: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The tail every method shares: train (resuming), add the method's own measurements (``extra_metrics(trainer)``,
    run on every rank: under ZeRO-3 a forward pass is collective), log and save metrics and state, then on the main
    process save model + processor, the training info (:data:`TRAINING_INFO_FILE`) and the model card.

    ``save_model(output_dir)`` replaces ``trainer.save_model`` where the trainer holds only part of what is saved (the
    warm-up trains the LLM and saves the whole model); it is called on every rank."""
    result = trainer.train(resume_from_checkpoint=checkpoint)
    # TRL reports some statistics as None when a run had nothing to measure them on (GRPO's clip-ratio extremes
    # when no token was clipped); log_metrics cannot format None, and an absent figure says the same.
    metrics = {key: value for key, value in result.metrics.items() if value is not None}
    metrics["train_examples"] = len(trainer.train_dataset)
    metrics["world_size"] = training_args.world_size
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        metrics["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    if extra_metrics is not None:
        metrics.update(extra_metrics(trainer) or {})
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)  # train_results.json, merged into all_results.json
    trainer.save_state()
    (save_model or trainer.save_model)(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        output_dir = Path(training_args.output_dir)
        processor.save_pretrained(output_dir)
        info = training_info(method, script_args, model_args, metrics, recipe, **(details or {}))
        (output_dir / TRAINING_INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
        with contextlib.suppress(Exception):  # the card is a courtesy; never fail a finished run over it
            trainer.create_model_card(model_name=output_dir.name, dataset_name=script_args.train_records,
                                      tags=["emoreason", "audio", method])
    trainer.accelerator.wait_for_everyone()
    return metrics


def shutdown_distributed() -> None:
    """Leave the process group together: a rank that exits while rank 0 (which hosts the rendezvous store) is still
    writing files can see its connection reset and exit non-zero, failing the whole `accelerate launch`."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def recipe_path(argv: list[str]) -> str | None:
    """The ``--config`` file named on a command line (``--config FILE`` or ``--config=FILE``), if any."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def run_cli(parser, main, argv: list[str] | None = None) -> int:
    """Parse (script, training, model) arguments from a YAML recipe + command-line overrides and run ``main``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    main(script_args, training_args, model_args, recipe=recipe_path(argv))
    shutdown_distributed()
    return 0
