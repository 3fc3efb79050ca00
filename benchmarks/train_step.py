"""Training step time: cached encoder features vs live encoders, duration-proportional encoding vs 30 s padding.

    python benchmarks/train_step.py [--size base|large] [--clips 4] [--seconds 4] [--steps 3]
        [--device auto|cpu|cuda] [--dtype auto|float32|bfloat16] [--lm-hidden 512 --lm-layers 4]

Random-weight models with real encoder shapes (``base``: Whisper-base + WavLM-base-plus, runs on a laptop CPU;
``large``: Whisper-large-v3 + WavLM-large, for a GPU) and a small Qwen2-shaped LM, all built from configs (nothing is
downloaded). One optimizer step = collate + forward + backward + AdamW on the trainable parts (projector + LM; the
encoders are frozen, as the feature cache requires). Every variant runs in this one process on the same batch, and the
script prints the ratios side by side, with tokens/s and (on a GPU) peak memory per variant.

``--device auto`` takes the GPU when there is one; ``--dtype auto`` is bf16 there (as the GPU recipes) and float32 on a
CPU. ``--lm-hidden 3584 --lm-layers 28`` gives Qwen2.5-7B's shape (random weights; the LM then trains in full here,
unlike the LoRA recipes, so that needs a large GPU).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SIZES = {
    "base": {"whisper": dict(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048),
             "wavlm": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)},
    "large": {"whisper": dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                              num_mel_bins=128),
              "wavlm": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                            feat_extract_norm="layer", do_stable_layer_norm=True)},
}


def build(size: str, out: Path, lm_hidden: int, lm_layers: int):
    from transformers import (Qwen2Config, Qwen2ForCausalLM, Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel,
                              WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration)

    from emoreason.modeling import build_from_components
    from emoreason.testing.tiny import train_tokenizer

    shapes = SIZES[size]
    wcfg = WhisperConfig(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                         suppress_tokens=[], begin_suppress_tokens=[], decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
                         d_model=shapes["whisper"]["d_model"], max_target_positions=64,
                         **{k: v for k, v in shapes["whisper"].items() if k != "d_model"})
    WhisperForConditionalGeneration(wcfg).save_pretrained(out / "whisper")
    WhisperFeatureExtractor(feature_size=wcfg.num_mel_bins).save_pretrained(out / "whisper")
    WavLMModel(WavLMConfig(layerdrop=0.0, mask_time_prob=0.0, **shapes["wavlm"])).save_pretrained(out / "wavlm")
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True).save_pretrained(out / "wavlm")
    tok = train_tokenizer(out / "lm")
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=lm_hidden, intermediate_size=4 * lm_hidden,
                                 num_hidden_layers=lm_layers, num_attention_heads=8, num_key_value_heads=2,
                                 tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)).save_pretrained(out / "lm")
    return build_from_components(out / "whisper", out / "wavlm", out / "lm")


class MemoryCache:
    """The collator's cache interface over in-memory per-clip states (the disk format is measured by the tests)."""

    def __init__(self, items: dict):
        from emoreason.train.feature_cache import FeatureCache

        self.items = items
        self._reader = FeatureCache.__new__(FeatureCache)
        self._reader.index = dict.fromkeys(items, "mem")
        self._reader.get = lambda clip_id: self.items[clip_id]

    def lookup(self, clip_ids):
        return self._reader.lookup(clip_ids)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lm-hidden", type=int, default=512)
    parser.add_argument("--lm-layers", type=int, default=4)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    recipe = parser.add_argument_group("--recipe mode: one recipe's SFT step against a transformers + PEFT floor")
    recipe.add_argument("--recipe", help="an SFT recipe (recipes/<model>/sft.yaml): LoRA, checkpointing, dtype, "
                                         "batch as written (--dtype overrides)")
    recipe.add_argument("--proxy", action="store_const", const="proxy", dest="scale",
                        help="the real depths at a tiny width (host overhead; the default)")
    recipe.add_argument("--real", action="store_const", const="real", dest="scale", help="the real shapes (GPU)")
    recipe.add_argument("--width", type=int, default=64, help="the proxy's width")
    recipe.add_argument("--tokens", type=int, default=690, help="tokens per example (audio included)")
    recipe.add_argument("--batch", type=int, default=0, help="examples per step (0: the recipe's)")
    recipe.add_argument("--packing", action="store_true", help="also time the same examples packed in one row")
    recipe.add_argument("--cached", action="store_true", help="also time ours with the towers' outputs cached")
    recipe.add_argument("--corpus", help="records.jsonl (e.g. `emoreason synth-corpus`): batches from it instead of "
                                         "synthetic tones and text (--tokens, --seconds then unused)")
    recipe.add_argument("--corpus-batches", type=int, default=4, help="micro-batches per optimizer step")
    recipe.add_argument("--corpus-tasks", default="emotion_label,transcription,captioning")
    recipe.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    recipe.add_argument("--peak-tflops", type=float, default=0.0,
                        help="the device's dense peak for MFU (default: 989, an H200's bf16, on CUDA)")
    recipe.add_argument("--profile-top", type=int, default=0, help="print each variant's N costliest operators")
    parser.set_defaults(scale="proxy")
    args = parser.parse_args(argv)
    if args.recipe:
        if args.seconds == 4.0:
            args.seconds = 2.4  # the first GPU run's clips
        return recipe_main(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    from emoreason.data.audio import write_wav
    from emoreason.train.collators import SFTCollator
    from emoreason.train.feature_cache import encode_clip

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, processor = build(args.size, root / "model", args.lm_hidden, args.lm_layers)
        model.to(device=device, dtype=dtype).train()  # the model casts audio inputs to each tower's dtype
        rng = np.random.default_rng(0)
        rows = []
        for i in range(args.clips):
            seconds = args.seconds * (0.75 + 0.5 * i / max(1, args.clips - 1))  # clips of different lengths
            t = np.arange(int(seconds * 16000)) / 16000
            wav = 0.3 * np.sin(2 * np.pi * (140 + 20 * i) * t) + 0.01 * rng.standard_normal(t.shape)
            write_wav(root / f"clip{i}.wav", wav.astype(np.float32))
            padded = np.zeros(30 * 16000, dtype=np.float32)
            padded[: wav.shape[0]] = wav
            write_wav(root / f"clip{i}_30s.wav", padded)
            rows.append({"id": f"c{i}", "clip_id": f"c{i}", "audio": f"clip{i}.wav", "duration": seconds,
                         "instruction": "What emotion does the speaker express?",
                         "response": "<think>\nThe pitch is high and the rate is fast.\n</think>\n<answer>happy</answer>"})
        rows_30s = [{**r, "audio": f"clip{i}_30s.wav", "clip_id": f"p{i}"} for i, r in enumerate(rows)]
        model.eval()
        cache = MemoryCache({r["clip_id"]: encode_clip(model, processor, processor.load(str(root / r["audio"])))
                             for r in rows})
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        variants = {
            "cached features": (SFTCollator(processor, root, feature_cache=cache), rows),
            "live encoders": (SFTCollator(processor, root), rows),
            "live, 30 s padding": (SFTCollator(processor, root), rows_30s),
        }

        tokens: dict[str, int] = {}
        peak: dict[str, float] = {}

        def step(collator, batch_rows):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            batch = {k: v.to(device) for k, v in collator(batch_rows).items()}
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start, int(batch["attention_mask"].sum())

        times = {name: [] for name in variants}
        for name, (collator, batch_rows) in variants.items():
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _, tokens[name] = step(collator, batch_rows)  # warm-up (also creates the optimizer state)
            if device == "cuda":
                peak[name] = torch.cuda.max_memory_allocated() / 2**30
        for _ in range(args.steps):  # interleaved, so drifts in machine load hit every variant alike
            for name, (collator, batch_rows) in variants.items():
                times[name].append(step(collator, batch_rows)[0])

    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"train step, {args.size} encoder shapes, LM {args.lm_layers}x{args.lm_hidden}, {args.clips} clips of "
          f"~{args.seconds:g} s, {device} {str(dtype).replace('torch.', '')}, median of {args.steps}")
    for name, value in median.items():
        memory = f"   peak {peak[name]:6.2f} GiB" if name in peak else ""
        print(f"  {name:<22} {value * 1000:9.1f} ms   {tokens[name] / value:9.0f} tokens/s{memory}")
    print(f"cached / live                        = {median['cached features'] / median['live encoders']:.3f}"
          "   (target <= 0.5)")
    print(f"duration-proportional / 30 s padding = {median['live encoders'] / median['live, 30 s padding']:.3f}")
    return 0


# -- --recipe: one recipe's SFT step (LoRA, checkpointing, dtype as written) against a plain transformers + PEFT floor
# Ops that only make views or allocate: their time is dispatch overhead, i.e. host time, even on a CPU.
METADATA_OPS = {
    "aten::view", "aten::_unsafe_view", "aten::as_strided", "aten::empty", "aten::empty_like", "aten::empty_strided",
    "aten::t", "aten::transpose", "aten::reshape", "aten::expand", "aten::permute", "aten::slice", "aten::select",
    "aten::unsqueeze", "aten::squeeze", "aten::detach", "aten::alias", "aten::lift_fresh", "aten::resolve_conj",
    "aten::resolve_neg", "aten::unbind", "aten::split", "aten::chunk", "aten::narrow", "aten::split_with_sizes",
    "aten::expand_as", "aten::view_as", "aten::contiguous", "aten::result_type", "aten::is_nonzero", "aten::item",
    "aten::_local_scalar_dense", "aten::size", "aten::stride", "aten::numel", "aten::dim", "detach", "aten::_reshape_alias",
    "aten::unflatten", "aten::flatten", "aten::movedim", "aten::set_", "aten::resize_", "aten::_has_compatible_shallow_copy_type",
}


def host_share(run_step, device: str, top: int = 0) -> tuple[float, float, int]:
    """(host share of one step, its wall seconds, operator calls) from torch.profiler.

    On a GPU: 1 - (union of device-kernel time) / wall. On a CPU, where the kernels run on the same thread: the self
    CPU time of the aten operators that compute (view and allocation operators excluded) is kernel time; the rest of
    the wall time (Python, hooks, autograd bookkeeping, dispatch) is host time. The operator count is the GPU's host
    cost in another unit: each operator is a launch of some microseconds whatever the width."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        run_step()
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.events()
    if device == "cuda":
        spans = sorted((e.time_range.start, e.time_range.end) for e in events
                       if e.device_type == torch.autograd.DeviceType.CUDA)
        busy, end = 0.0, -1.0
        for s, e in spans:
            if e > end:
                busy += e - max(s, end)
                end = e
        kernel = busy / 1e6
    else:
        kernel = sum(e.self_cpu_time_total for e in events
                     if e.name.startswith("aten::") and e.name not in METADATA_OPS) / 1e6
    calls = sum(1 for e in events if e.name.startswith("aten::"))
    if top:
        print(prof.key_averages(group_by_stack_n=0).table(sort_by="self_cpu_time_total", row_limit=top))
    return max(0.0, 1.0 - kernel / wall), wall, calls


def lm_flops_per_token(config, seq: int) -> float:
    """Training FLOPs per token of the LM, PaLM's count (Chowdhery et al. 2022, app. B): 6 N (N: parameters of the
    decoder layers + LM head, embeddings excluded) + 12 L d seq (attention scores and values); recompute not
    counted; LoRA counted as 6 N too, as NeMo and others report LoRA MFU."""
    d, layers, ffn = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    per_layer = d * head_dim * (2 * heads + 2 * kv) + 3 * d * ffn
    n = layers * per_layer + d * config.vocab_size
    return 6 * n + 12 * layers * d * seq


def recipe_main(args) -> int:
    import resource

    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from emoreason.train.collators import SFTCollator
    from emoreason.modeling import build_from_components
    from emoreason.modeling.lora import apply_lora, language_model_lora_config
    from emoreason.testing.recipe_parts import build_recipe_parts

    recipe = yaml.safe_load(Path(args.recipe).read_text())
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else getattr(torch, recipe.get("dtype", "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_size = args.batch or int(recipe.get("per_device_train_batch_size", 4))
    attn = recipe.get("attn_implementation")
    targets = recipe.get("lora_target_modules")
    checkpointing = bool(recipe.get("activation_checkpointing") or recipe.get("gradient_checkpointing"))
    ckpt_kwargs = dict(recipe.get("activation_checkpointing_kwargs") or {"use_reentrant": False})
    lora = dict(r=int(recipe.get("lora_r", 16)), alpha=int(recipe.get("lora_alpha", 32)),
                dropout=float(recipe.get("lora_dropout", 0.05)), target_modules=targets)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = build_recipe_parts(args.recipe, root / "parts", scale=args.scale, tiny_width=args.width,
                                   device=device, dtype=dtype)
        model, processor = build_from_components(
            paths["content_encoder"], paths["paralinguistic_encoder"], paths["language_model"],
            stack_factor=int(recipe.get("stack_factor", 4)), fusion=recipe.get("fusion", "concat"),
            dtype=dtype, **({"attn_implementation": attn} if attn else {}))
        model.to(device)
        if recipe.get("use_peft"):
            model = apply_lora(model, language_model_lora_config(**lora))
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
        model.train()

        collator = SFTCollator(processor, root, max_length=recipe.get("max_length"),
                               system_prompt=recipe.get("system_prompt"))
        packed_collator = SFTCollator(processor, root, max_length=recipe.get("max_length"),
                                      system_prompt=recipe.get("system_prompt"), packing=True) if args.packing else None
        if args.corpus:
            batches_rows = corpus_batches(args.corpus, batch_size, args.corpus_batches, args.corpus_tasks)
            for c in (collator, packed_collator):
                if c is not None:
                    c.data_root = Path(args.corpus).parent
        else:
            batches_rows = [synthetic_rows(root, batch_size, args.seconds, args.tokens, collator)]
        padded = [{k: _to(v, device) for k, v in collator(r).items()} for r in batches_rows]
        tokens = sum(int(b["attention_mask"].sum()) for b in padded)
        padded_tokens = sum(b["input_ids"].numel() for b in padded)

        # the floor: the same LM (its own checkpoint) with PEFT on the same modules, the same token batches
        floor = AutoModelForCausalLM.from_pretrained(paths["language_model"], dtype=dtype,
                                                     **({"attn_implementation": attn} if attn else {})).to(device)
        if recipe.get("use_peft"):
            floor = get_peft_model(floor, LoraConfig(
                task_type="CAUSAL_LM", r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                target_modules=list(targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"]), bias="none"))
        if checkpointing:
            floor.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
        floor.train()
        floor_batches = []
        for b in padded:
            ids = b["input_ids"].clone()
            ids[ids >= floor.get_input_embeddings().num_embeddings] = 3  # `<audio>` is ours only
            floor_batches.append({"input_ids": ids, "attention_mask": b["attention_mask"], "labels": b["labels"]})

        variants = {"ours": (model, padded), "floor": (floor, floor_batches)}
        if args.cached:  # the towers' outputs from the feature cache (frozen towers): the step without them
            from emoreason.train.feature_cache import encode_clip

            model.eval()
            cache = MemoryCache({r.get("clip_id") or r["id"]: encode_clip(model, processor, collator.load_clip(r))
                                 for rows_ in batches_rows for r in rows_})
            model.train()
            cached_collator = SFTCollator(processor, collator.data_root, max_length=recipe.get("max_length"),
                                          system_prompt=recipe.get("system_prompt"), feature_cache=cache)
            variants["ours, cached"] = (model, [{k: _to(v, device) for k, v in cached_collator(r).items()}
                                                for r in batches_rows])
        if args.packing:
            variants["ours, packed"] = (model, [{k: _to(v, device) for k, v in packed_collator(r).items()}
                                                for r in batches_rows])
        optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5,
                                              fused=device == "cuda")  # the Trainer's default optim there
                      for name, (m, _) in variants.items()}

        def step(name):  # one optimizer step over the micro-batches (gradient accumulation)
            m, batches = variants[name]
            for batch in batches:
                m(**batch).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)

        def timed(name):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(name)
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

        peak = {}
        for name in variants:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            timed(name)  # warm-up, optimizer state
            peak[name] = (torch.cuda.max_memory_allocated() / 2**30 if device == "cuda"
                          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        times = {name: [] for name in variants}
        for _ in range(args.steps):  # interleaved: load drifts hit every variant alike
            for name in variants:
                times[name].append(timed(name))
        profiles = {}
        for name in variants:
            if args.profile_top:
                print(f"-- {name}")
            profiles[name] = host_share(lambda n=name: step(n), device, args.profile_top)
        collate = statistics.median(_time(lambda: [collator(r) for r in batches_rows]) for _ in range(3))

    median = {name: statistics.median(t) for name, t in times.items()}
    seq = max(b["input_ids"].shape[1] for b in padded)
    lm_config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config.text_config
    flops_token = lm_flops_per_token(lm_config, seq)
    peak_tflops = args.peak_tflops if args.peak_tflops else (989.0 if device == "cuda" else None)
    print(f"train step, recipe {args.recipe} ({args.scale} scale, width {args.width if args.scale != 'real' else 'real'}),"
          f" {len(batches_rows)} x {batch_size} examples, {tokens / batch_size / len(batches_rows):.0f} tokens each"
          f" ({100 * (1 - tokens / padded_tokens):.0f}% padding), {device} {str(dtype).replace('torch.', '')},"
          f" LoRA r{lora['r']} on {len(targets or [])} modules, checkpointing {checkpointing}, median of {args.steps}")
    print("  MFU: PaLM count, 6 N + 12 L d seq per token (LM only; N without embeddings; towers and recompute not"
          f" counted) = {flops_token / 1e6:.2f} MFLOP/token" + ("" if peak_tflops else "; no peak given on a CPU"))
    memory_unit = "GiB allocated" if device == "cuda" else "GiB max RSS (process)"
    for name, value in median.items():
        share, wall, calls = profiles[name]
        mfu = f"   MFU {100 * flops_token * tokens / value / (peak_tflops * 1e12):5.2f}%" if peak_tflops else ""
        print(f"  {name:<14} {value * 1000:9.1f} ms   {tokens / value:9.0f} tokens/s   host share {100 * share:4.1f}%"
              f"   {calls:6d} ops   peak {peak[name]:6.2f} {memory_unit}{mfu}")
    print(f"  collate (a dataloader worker's job, not in the step): {collate * 1000:.1f} ms")
    fastest = {name: min(t) for name, t in times.items()}  # on a shared machine, load only ever adds time
    print(f"ours / floor = {median['ours'] / median['floor']:.3f} (medians), {fastest['ours'] / fastest['floor']:.3f}"
          " (fastest steps)   (target <= 1.3)")
    if "ours, cached" in median:
        print(f"ours, cached / floor = {median['ours, cached'] / median['floor']:.3f} (medians), "
              f"{fastest['ours, cached'] / fastest['floor']:.3f} (fastest)")
    if "ours, packed" in median:
        print(f"packed / padded = {median['ours, packed'] / median['ours']:.3f} (medians), "
              f"{fastest['ours, packed'] / fastest['ours']:.3f} (fastest)")
    return 0


def _to(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def synthetic_rows(root: Path, batch_size: int, seconds: float, tokens: int, collator) -> list[dict]:
    """One batch: clips of about ``seconds`` (tones), responses long enough for about ``tokens`` tokens per example."""
    from emoreason.data.audio import write_wav

    rng = np.random.default_rng(0)
    rows = []
    for i in range(batch_size):
        length = seconds * (0.8 + 0.4 * i / max(1, batch_size - 1))
        t = np.arange(int(length * 16000)) / 16000
        wav = 0.3 * np.sin(2 * np.pi * (140 + 20 * i) * t) + 0.01 * rng.standard_normal(t.shape)
        write_wav(root / f"clip{i}.wav", wav.astype(np.float32))
        rows.append({"id": f"c{i}", "clip_id": f"c{i}", "audio": f"clip{i}.wav", "duration": length,
                     "instruction": "What emotion does the speaker express?", "response": ""})
    sentence = "The pitch rises and falls quickly while the voice stays loud and tense. "
    words = 8
    for _ in range(4):  # fit the response length to the token target
        for r in rows:
            r["response"] = "<think>\n" + (sentence * words) + "\n</think>\n<answer>angry</answer>"
        per_row = collator(rows)["attention_mask"].sum(-1).float().mean().item()
        words = max(1, round(words * tokens / per_row))
    return rows


def corpus_batches(records: str, batch_size: int, count: int, tasks: str) -> list[list[dict]]:
    """``count`` batches of a records file as SFT draws them (one task per batch, tasks in turn), shuffled with a fixed
    seed and not length-grouped: the padding a batch carries when nothing sorts it."""
    import random

    from emoreason.data.schema import read_records
    from emoreason.train.tasks import build_task_examples, parse_task_specs

    rows = build_task_examples(parse_task_specs(tasks), read_records(records), split=None, seed=0)
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    rng = random.Random(0)
    chunks = []
    for task_rows in by_task.values():
        rng.shuffle(task_rows)
        chunks.append([task_rows[i : i + batch_size] for i in range(0, len(task_rows) - batch_size + 1, batch_size)])
    batches = [b for group in zip(*chunks) for b in group]
    if len(batches) < count:
        raise SystemExit(f"{records}: only {len(batches)} full batches of {batch_size} for tasks {tasks}")
    return batches[:count]


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    raise SystemExit(main())
