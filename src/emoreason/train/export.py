"""`emoreason export CHECKPOINT --merge --output DIR`: a standalone checkpoint, ready to serve.

An SFT (or GRPO/DPO) output folder holds a LoRA adapter on the language model plus the trained projector, pointing at
its base model. ``--merge`` folds the adapter into the weights (``merge_and_unload``: the projector copy saved with the
adapter replaces the base one) and writes model + processor + a model card naming the recipe, the data and the
metrics of the run (read from ``emoreason_training.json``). A checkpoint trained in full (no adapter) is re-saved the
same way. The result loads with ``EmoReasonForConditionalGeneration.from_pretrained`` / ``load_pretrained``; no PEFT
needed to serve it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .common import TRAINING_INFO_FILE


def load_checkpoint(path: str | Path, dtype: str | None = None):
    """(model, processor) from a training output: adapter folders are loaded onto their base model."""
    from ..modeling import EmoReasonProcessor
    from .common import EmoReasonModelArguments, get_model

    args = EmoReasonModelArguments(model_name_or_path=str(path), dtype=dtype)
    model = get_model(args)
    processor_dir = Path(path) if (Path(path) / "processor_config.json").exists() else None
    if processor_dir is None:
        from ..modeling.loading import checkpoint_base

        processor_dir = Path(checkpoint_base(path))
    return model, EmoReasonProcessor.from_pretrained(processor_dir)


def merge(model):
    """Fold LoRA adapters into the base weights; a model without adapters is returned as is."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.config._name_or_path = ""
    return model


def method_lines(info: dict[str, Any]) -> list[str]:
    """The card lines for what the method itself was given (written by train.common.training_info)."""
    lines = []
    if info.get("tasks"):
        lines.append(f"- tasks: {', '.join(info['tasks'])} (schedule: {info.get('task_schedule')})")
    if info.get("reward_funcs"):
        weights = info.get("reward_weights")
        lines.append(f"- rewards: {', '.join(info['reward_funcs'])}" + (f" (weights {weights})" if weights else ""))
    if info.get("method") in ("grpo", "dpo") and info.get("beta") is not None:
        lines.append(f"- beta: {info['beta']}")
    if info.get("text_prior_gamma"):
        lines.append(f"- text-prior debiasing gamma: {info['text_prior_gamma']}")
    return lines


def model_card(info: dict[str, Any], source: str) -> str:
    metrics = info.get("metrics") or {}
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    lines = [
        "---",
        "library_name: transformers",
        "tags: [emoreason, audio, speech-emotion-recognition, " + info.get("method", "sft") + "]",
        "---",
        "",
        "# EmoReason checkpoint",
        "",
        "A dual-encoder audio LLM (content encoder + paralinguistic encoder + projector + language model) fine-tuned "
        "with emoreason to reason about emotion in speech. Adapters are merged: load it with "
        "`emoreason.modeling.load_pretrained(path)` or serve it with `emoreason serve`.",
        "",
        f"- exported from: `{source}`",
        f"- method: {info.get('method', 'unknown')}",
        f"- recipe: `{info.get('recipe')}`",
        f"- training records: `{info.get('train_records')}`",
        *method_lines(info),
        f"- base model: `{json.dumps(info.get('model'))}`",
        f"- LoRA: {'yes (merged)' if info.get('use_peft') else 'no (trained in full)'}",
        "",
        "## Metrics",
        "",
    ]
    if shown:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in sorted(shown.items())]
    else:
        lines.append("No metrics were recorded for this run.")
    return "\n".join(lines) + "\n"


def export(checkpoint: str | Path, output: str | Path, do_merge: bool = True, dtype: str | None = None) -> Path:
    checkpoint, output = Path(checkpoint), Path(output)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"export: checkpoint {checkpoint} is not a folder")
    if output.resolve() == checkpoint.resolve():
        raise ValueError("export: --output must differ from the checkpoint folder")
    model, processor = load_checkpoint(checkpoint, dtype=dtype)
    is_adapter = hasattr(model, "merge_and_unload")
    if is_adapter and not do_merge:
        raise ValueError(f"export: {checkpoint} holds a LoRA adapter; pass --merge to fold it into the weights")
    model = merge(model)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)  # safetensors
    processor.save_pretrained(output)
    info_file = checkpoint / TRAINING_INFO_FILE
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    (output / "README.md").write_text(model_card(info, str(checkpoint)))
    if info:
        (output / TRAINING_INFO_FILE).write_text(json.dumps(info, indent=2))
    return output


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emoreason export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="training output folder (adapter or full model)")
    parser.add_argument("--output", required=True, help="folder for the standalone checkpoint")
    parser.add_argument("--merge", action="store_true", help="merge LoRA adapters into the weights")
    parser.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16", "float16"],
                        help="weights dtype of the export (default: as trained)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        path = export(args.checkpoint, args.output, do_merge=args.merge, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as err:
        print(err, file=sys.stderr)
        return 2
    print(path)
    return 0


__all__ = ["export", "merge", "model_card", "load_checkpoint", "cli"]
