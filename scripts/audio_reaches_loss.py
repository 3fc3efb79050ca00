"""Does the audio reach the loss? The SFT loss of a checkpoint on a few training rows, with the real clips and with the
same clips zeroed (same lengths, so the same number of `<audio>` tokens), side by side.

    python scripts/audio_reaches_loss.py --model runs/sft [--records data/records.jsonl --data_root data]
        [--tasks emotion_reasoning] [--split train] [--rows 8] [--device auto] [--dtype auto]

``--model`` is anything ``model_name_or_path`` takes (a saved model, a merged export, or an SFT output folder with a
LoRA adapter). Run it before the first long job on a new model (the two losses must differ; on a fresh projector
they differ a little, after SFT the zeroed loss is clearly higher) and after SFT. It exits with status 1 when the two
losses are equal: then the audio tensors do not reach the loss and training would ignore the clips.
"""

from __future__ import annotations

import argparse
import sys

import torch

AUDIO_KEYS = ("input_features", "input_values", "content_states", "paralinguistic_states")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return torch.device(name)


@torch.no_grad()
def losses_with_and_without_audio(model, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(loss with the clips, loss with every audio tensor zeroed; masks kept)."""
    real = model(**batch).loss.float().item()
    zeroed = {k: torch.zeros_like(v) if k in AUDIO_KEYS else v for k, v in batch.items()}
    silent = model(**zeroed).loss.float().item()
    return real, silent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model_name_or_path: saved model, export, or SFT adapter folder")
    parser.add_argument("--records", required=True, help="records file (JSONL or parquet)")
    parser.add_argument("--data_root", default=".", help="audio paths in records are relative to this folder")
    parser.add_argument("--tasks", default="emotion_reasoning", help="tasks to build rows for (as the recipe's tasks)")
    parser.add_argument("--split", default="train", help="records of this split ('all': every record)")
    parser.add_argument("--rows", type=int, default=8, help="rows in the batch")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="auto: bf16 on a GPU that supports it, else float32")
    args = parser.parse_args(argv)

    from emoreason.train.collators import SFTCollator
    from emoreason.train.common import EmoReasonModelArguments, get_model, get_processor
    from emoreason.train.tasks import build_task_examples, parse_task_specs

    device = pick_device(args.device)
    if args.dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    else:
        dtype = args.dtype
    model_args = EmoReasonModelArguments(model_name_or_path=args.model, dtype=dtype)
    processor = get_processor(model_args)
    model = get_model(model_args, processor).to(device).eval()
    rows = build_task_examples(parse_task_specs(args.tasks), args.records,
                               split=None if args.split in ("all", "") else args.split, seed=0, max_records=args.rows)
    rows = rows[: args.rows]
    batch = {k: v.to(device) for k, v in SFTCollator(processor, args.data_root)(rows).items()}
    real, silent = losses_with_and_without_audio(model, batch)
    print(f"{args.model}: {len(rows)} rows ({args.tasks}, split {args.split}), {device} {dtype}")
    print(f"  loss with the audio   {real:.4f}")
    print(f"  loss with zeroed audio {silent:.4f}")
    print(f"  difference (zeroed - real) {silent - real:+.4f}")
    if silent == real:
        print("the audio does not reach the loss: both losses are equal", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
