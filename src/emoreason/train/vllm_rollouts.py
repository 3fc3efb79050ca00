"""GRPO rollouts through vLLM with the audio: the colocated engine of TRL's ``VLLMGeneration``, fed clips.

TRL 1.16 sends vLLM token ids and images only, so an audio prompt would be generated from its `<audio>` placeholders
alone. :class:`AudioVLLMGeneration` keeps TRL's machinery (sampling parameters, importance-sampling log-probs, the
sync-after-each-step bookkeeping in the trainer) and changes three things:

- **prompts**: each row goes to ``LLM.generate`` as ``{"prompt_token_ids": ids, "multi_modal_data": {"audio":
  (waveform, 16000)}}``. The ids are the trainer's own with the clip's run of `<audio>` placeholders collapsed to one:
  vLLM expands a token prompt's placeholder itself (a pre-expanded run would be expanded again from its first token),
  through our plugin (:mod:`emoreason.serve.vllm_model`), which takes the count from the same token-count function as
  the processor. The expanded prompt vLLM reports is checked against the trainer's, so the engine decodes from
  exactly the prompt the loss scores.
- **weights**: :func:`policy_state` is what the engine receives after each optimizer step: the LoRA merged into the
  base weights out of place (``W + scaling * B @ A`` in float32, cast once to the engine's dtype; TRL's in-place
  merge/unmerge makes a bfloat16 base drift at every sync), the active copy of each ``modules_to_save`` module (the
  projector; never the frozen "ref" copy) *and the persistent buffers* (the projector's feature-normalisation
  statistics, which TRL's parameter walk skips). Names are the checkpoint's; the vLLM model's ``load_weights`` maps
  them.
- **engine**: built for the policy's dtype with one clip per prompt; on CPU eager and in-process (vLLM's CPU build),
  with a small KV cache unless ``VLLM_CPU_KVCACHE_SPACE`` says otherwise, and with its packed linear kernels
  replaced by plain weights (:func:`unpack_cpu_linears`), since packed weights cannot be updated in place.

Only colocate mode with ``vllm_tensor_parallel_size == 1`` carries audio (each rank runs its own engine on its own
rows); :func:`audio_vllm_refusal` names the configurations that cannot, and the trainer refuses them.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from trl.generation.vllm_generation import VLLMGeneration, extract_logprobs

from emoreason.data.audio_tokens import SAMPLE_RATE

logger = logging.getLogger(__name__)

SUPPORTED_MODES = ("colocate",)
CPU_KVCACHE_GIB = "1"  # VLLM_CPU_KVCACHE_SPACE default here: GRPO batches are small; vLLM's own default is 4 GiB


def audio_vllm_refusal(args) -> str | None:
    """Why this GRPO config cannot send audio to vLLM, or None when it can."""
    if not getattr(args, "use_vllm", False):
        return None
    mode = getattr(args, "vllm_mode", "colocate")
    if mode == "server":
        return ("vllm_mode='server' cannot carry audio: TRL's vLLM client (trl vllm-serve) sends token ids and image "
                "features only, so the clips would not reach generation. Use vllm_mode='colocate' (docs/rl.md, "
                "'Rollouts through vLLM'), or leave use_vllm off")
    if mode not in SUPPORTED_MODES:
        return f"vllm_mode={mode!r} is not a vLLM mode (colocate or server)"
    if getattr(args, "vllm_tensor_parallel_size", 1) != 1:
        return ("vllm_tensor_parallel_size > 1 cannot carry audio yet: the tensor-parallel group gathers prompts and "
                "images across ranks but not clips. Use vllm_tensor_parallel_size=1 (one engine per rank)")
    if getattr(args, "vllm_enable_sleep_mode", False):
        return ("vllm_enable_sleep_mode cannot be used with audio rollouts: sleeping level 2 drops the weights and "
                "the re-push after waking is TRL's parameter walk, which skips the projector's normalisation buffers")
    return None


def unpack_cpu_linears(model) -> int:
    """Make a vLLM model loaded on CPU updatable in place; returns how many layers were changed.

    After loading, vLLM's CPU build hands every linear layer's weight to a packed GEMM kernel (oneDNN / sgl-kernel)
    and frees the weight, and packs a copy of embedding-tied heads: new values written into the parameters would never
    reach the kernels. This gives each such layer back a plain weight of its checkpoint shape, with its own loader
    (values arrive with the next ``load_weights``), and computes it with torch's GEMM.
    """
    import torch.nn.functional as F
    from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED, LinearBase

    def plain(x, weight, bias):
        return F.linear(x, weight, bias)

    changed = 0
    for module in model.modules():
        if not hasattr(module, "cpu_linear"):
            continue
        if isinstance(module, LinearBase) and module.weight.numel() == 0:
            method = module.quant_method
            v2 = type(method).__name__ in WEIGHT_LOADER_V2_SUPPORTED and hasattr(module, "weight_loader_v2")
            del module.weight
            method.create_weights(
                layer=module,
                input_size_per_partition=getattr(module, "input_size_per_partition", module.input_size),
                output_partition_sizes=module.output_partition_sizes,
                input_size=module.input_size,
                output_size=module.output_size,
                params_dtype=module.params_dtype,
                weight_loader=module.weight_loader_v2 if v2 else module.weight_loader,
            )
        module.cpu_linear = plain
        changed += 1
    return changed


def collapse_runs(ids: list[int], token: int) -> list[int]:
    """``ids`` with each run of ``token`` reduced to a single ``token``."""
    out: list[int] = []
    for t in ids:
        if t == token and out and out[-1] == token:
            continue
        out.append(int(t))
    return out


@contextmanager
def audio_rollout_engine(dtype: torch.dtype | None = None):
    """While constructing the trainer, TRL's ``GRPOTrainer`` builds :class:`AudioVLLMGeneration` where it would build
    its own ``VLLMGeneration`` (same arguments, plus the policy's dtype for the engine)."""
    import trl.trainer.grpo_trainer as trl_grpo

    original = trl_grpo.VLLMGeneration
    trl_grpo.VLLMGeneration = functools.partial(AudioVLLMGeneration, dtype=dtype)
    try:
        yield
    finally:
        trl_grpo.VLLMGeneration = original


class UnsupportedAdapterError(ValueError):
    """An adapter whose merged weights :func:`merged_lora_weights` cannot build."""


def merged_lora_weights(layer, adapter: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The base layer's tensors with ``adapter`` merged in, built out of place: ``{"weight": ..., ["bias": ...]}``.

    ``W + scaling * (B @ A)`` is computed in float32 from the stored tensors and cast once to ``dtype`` (default: the
    base weight's dtype); the layer's own tensors are only read. PEFT's ``merge_adapter`` / ``unmerge_adapter`` instead
    add the delta into the live weight and subtract it again, which in bfloat16 does not give the weight back: the
    frozen base drifted at every sync (TRL issue 6688). ``scaling`` is PEFT's own (``lora_alpha / r``, or
    ``lora_alpha / sqrt(r)`` with rsLoRA); dropout plays no part in a merge. DoRA (linear layers) merges as PEFT
    merges it: ``m / ||W + scaling * B @ A||`` (the norm of each output row) times ``W + scaling * B @ A``.
    ``lora_bias`` adds ``scaling * lora_B.bias`` to the base bias. Other layer types and LoRA variants are refused.
    """
    from peft.tuners.lora.layer import Embedding, Linear
    from peft.tuners.lora.variants import DoraLinearVariant
    from peft.utils.other import transpose

    variant = layer.lora_variant.get(adapter)
    dora = isinstance(variant, DoraLinearVariant)
    kind = type(layer).__name__
    if variant is not None and not (dora and isinstance(layer, Linear)):
        raise UnsupportedAdapterError(
            f"the weight sync cannot merge the {type(variant).__name__} variant of adapter {adapter!r} on {kind} "
            "layers out of place; plain LoRA, rsLoRA and DoRA on linear layers are supported")
    base = layer.get_base_layer()
    weight = base.weight
    if not weight.is_floating_point():
        raise UnsupportedAdapterError(f"the weight sync merges into floating-point base weights; this {kind} layer "
                                      f"holds {weight.dtype} (a quantised base): load the base unquantised to sync")
    out_dtype = dtype or weight.dtype
    scaling = layer.scaling[adapter]
    if isinstance(layer, Linear) and adapter in layer.lora_A:
        fan_in_fan_out = layer.fan_in_fan_out
        lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
        delta = (lora_b.weight.float() @ lora_a.weight.float()) * scaling  # (out, in)
        merged = transpose(weight, fan_in_fan_out).float() + delta
        if dora:
            magnitude = layer.lora_magnitude_vector[adapter].weight.float()
            merged = (magnitude / torch.linalg.norm(merged, dim=1)).view(-1, 1) * merged
        tensors = {"weight": transpose(merged, fan_in_fan_out).to(out_dtype)}
        if layer.lora_bias.get(adapter, False):
            if base.bias is None:
                raise UnsupportedAdapterError("lora_bias=True on a base layer without a bias")
            tensors["bias"] = (base.bias.float() + lora_b.bias.float() * scaling).to(base.bias.dtype
                                                                                     if dtype is None else dtype)
        return tensors
    if isinstance(layer, Embedding) and adapter in layer.lora_embedding_A:
        delta = (layer.lora_embedding_B[adapter].float() @ layer.lora_embedding_A[adapter].float()).T * scaling
        return {"weight": (weight.float() + delta).to(out_dtype)}
    raise UnsupportedAdapterError(f"the weight sync cannot merge adapter {adapter!r} on a {kind} layer out of place; "
                                  "LoRA on linear and embedding layers is supported")


def policy_state(model, adapter: str | None = None,
                 dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) for every tensor a full checkpoint of ``model`` holds, LoRA merged in.

    For a PEFT model each adapted layer's weight is built out of place (:func:`merged_lora_weights`, in float32, cast
    once to ``dtype`` or the base weight's dtype), one layer at a time as the caller reads: the model's own tensors are
    never written, so a sync leaves the frozen base bit-identical. Only the active adapter's copy of a
    ``modules_to_save`` module is yielded, under the base module's name (never the frozen "ref" copy). Persistent
    buffers come with the parameters (``state_dict``), so fitted feature-normalisation statistics reach the engine.
    """
    from peft import PeftModel
    from peft.tuners.lora.layer import LoraLayer

    if not isinstance(model, PeftModel):
        for name, tensor in model.state_dict(keep_vars=True).items():
            yield name, tensor.detach()
        return
    active = adapter or model.active_adapter
    lora_marker = model.prefix  # "lora_" for LoRA: the factors, merged into their base layer's tensors below
    layers = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    merged_layers = [name for name, layer in layers.items() if layer.merged]
    if merged_layers:
        raise RuntimeError(f"{len(merged_layers)} LoRA layers (e.g. {merged_layers[0]}) have an adapter merged into "
                           "their weights; the sync merges out of place and would add it twice: unmerge first")
    merged: tuple[str, dict[str, torch.Tensor]] | None = None  # the current layer's merged tensors
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if lora_marker in name or ".original_module." in name:
                continue
            owner, marker, local = name.rpartition(".base_layer.")
            if marker and owner in layers and active in layers[owner].scaling:
                if merged is None or merged[0] != owner:
                    merged = owner, merged_lora_weights(layers[owner], active, dtype)
                tensor = merged[1].get(local, tensor)
            name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            if ".modules_to_save." in name:
                prefix, _, rest = name.partition(".modules_to_save.")
                owner, _, local = rest.partition(".")
                if owner != active:
                    continue  # another adapter's copy (the frozen reference's)
                name = f"{prefix}.{local}"
            yield name, tensor.detach()


class AudioVLLMGeneration(VLLMGeneration):
    """TRL's colocated vLLM generation, with one clip per prompt row and the full policy state synced."""

    def __init__(self, *args, dtype: torch.dtype | str | None = None, **kwargs):
        self.dtype = dtype
        super().__init__(*args, **kwargs)

    # -- the engine -----------------------------------------------------------------------------------------------
    def _init_vllm(self):
        if self.mode != "colocate" or self.tensor_parallel_size != 1 or self.enable_sleep_mode:
            raise ValueError("audio rollouts run in colocate mode with tensor_parallel_size=1 and no sleep mode "
                             "(see emoreason.train.vllm_rollouts.audio_vllm_refusal)")
        from trl.trainer.utils import ensure_master_addr_port
        from vllm import LLM
        from vllm.platforms import current_platform

        accelerator = self.accelerator
        on_cpu = current_platform.is_cpu()
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
        single = accelerator.num_processes == 1
        if single:
            # The engine core runs in this process, so load_weights reaches the model without pickling tensors.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        else:  # one engine per rank, as TRL's colocate mode
            os.environ["RANK"] = str(accelerator.process_index)
            os.environ["LOCAL_RANK"] = str(accelerator.local_process_index)
            os.environ["WORLD_SIZE"] = str(accelerator.num_processes)
            ensure_master_addr_port()
        dtype = self.dtype or "auto"
        self.llm = LLM(
            model=self.model.name_or_path,
            dtype=str(dtype).removeprefix("torch.") if not isinstance(dtype, str) else dtype,
            tensor_parallel_size=1,
            max_model_len=self.max_model_length,
            max_num_seqs=self.max_num_seqs,
            distributed_executor_backend="uni" if single else "external_launcher",
            seed=accelerator.process_index,
            limit_mm_per_prompt={"audio": 1},
            # Log-probs after temperature etc., as TRL asks, so importance sampling compares like with like.
            logprobs_mode="processed_logprobs",
            trust_remote_code=False,
            **({"enforce_eager": True} if on_cpu else
               {"gpu_memory_utilization": self.gpu_memory_utilization, "max_num_batched_tokens": 4096}),
        )
        self._llm_weights_sleeping = False
        if on_cpu:
            # The CPU build's packed weights cannot be updated in place: unpack them, then load the policy at once
            # (its state at step 0: the checkpoint plus anything set on the model before training).
            self.llm.apply_model(unpack_cpu_linears)
            self.sync_weights()
        accelerator.wait_for_everyone()

    # -- weights --------------------------------------------------------------------------------------------------
    def _load_into_engine(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        # The engine runs in this process, so the model reads the tensors as policy_state builds them.
        def load(model):
            model.load_weights(weights)

        self.llm.apply_model(load)

    def sync_weights(self):
        """Load the policy's full state (merged LoRA, active projector, buffers) into the engine; reset its caches."""
        model = self.accelerator.unwrap_model(self.model)
        device = self.accelerator.device
        dtype = self.dtype if isinstance(self.dtype, torch.dtype) else None  # the engine's (it was built for it)
        with self._dist.gather_params(list(model.parameters())):
            # A generator, consumed by the engine's loaders inside the gather: each merged weight is built as it is
            # read, out of place (the policy's own weights are never written).
            self._load_into_engine((name, tensor.to(device)) for name, tensor in policy_state(model, dtype=dtype))
        # Cached KV blocks and cached encoder outputs were computed with the old weights (the projector and its
        # normalisation shape every audio embedding): both go.
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()

    # -- rollouts -------------------------------------------------------------------------------------------------
    def rollout_prompts(self, prompts: list[list[int]], audio: list[Any | None]) -> list[dict]:
        """vLLM inputs: each row's ids with its run of `<audio>` placeholders collapsed to one (vLLM expands a
        token prompt's placeholder itself, to the count our plugin computes) and its clip."""
        if len(audio) != len(prompts):
            raise ValueError(f"{len(audio)} clips for {len(prompts)} prompt rows: each GRPO row carries one clip")
        audio_token = self.processing_class.audio_token_id
        rows = []
        for ids, clip in zip(prompts, audio):
            row: dict[str, Any] = {"prompt_token_ids": collapse_runs(ids, audio_token)}
            if clip is not None:
                row["multi_modal_data"] = {"audio": (clip, SAMPLE_RATE)}
            rows.append(row)
        return rows

    @staticmethod
    def check_expansion(sent: list[list[int]], seen) -> None:
        """The prompt vLLM decoded from must be the one the loss scores: same placeholder count per clip."""
        for row, (ids, output) in enumerate(zip(sent, seen)):
            if list(output.prompt_token_ids) != list(ids):
                raise RuntimeError(f"row {row}: vLLM expanded the prompt to {len(output.prompt_token_ids)} tokens, "
                                   f"the processor to {len(ids)}; the plugin and the processor disagree on the "
                                   "clip's audio token count")

    def generate_with_audio(self, prompts: list[list[int]], audio: list[Any | None], profiler=None,
                            **sampling_overrides) -> tuple[list, list, list | None]:
        """One completion per row (TRL's colocate contract: rows are already repeated num_generations times).

        Returns (prompt ids as the engine saw them, completion ids, per-token sampled log-probs or None).
        """
        from vllm import SamplingParams

        params = {
            "n": 1,
            "repetition_penalty": self.repetition_penalty,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": 0.0 if self.min_p is None else self.min_p,
            "max_tokens": self.max_completion_length,
            "logprobs": self.logprobs,
        }
        params.update(self.generation_kwargs)
        params.update(sampling_overrides)
        if self.structured_outputs_regex is not None:
            from vllm.sampling_params import StructuredOutputsParams

            params["structured_outputs"] = StructuredOutputsParams(regex=self.structured_outputs_regex)
        with profiler or nullcontext():
            outputs = self.llm.generate(self.rollout_prompts(prompts, audio),
                                        sampling_params=SamplingParams(**params), use_tqdm=False)
        self.check_expansion(prompts, outputs)
        prompt_ids = [list(output.prompt_token_ids) for output in outputs]
        completion_ids = [list(o.token_ids) for output in outputs for o in output.outputs]
        logprobs, _ = extract_logprobs(outputs)
        if logprobs is not None:
            logprobs = [[lp[0] for lp in seq] for seq in logprobs]
        return prompt_ids, completion_ids, logprobs

    def score(self, prompts: list[list[int]], completions: list[list[int]],
              audio: list[Any | None]) -> list[list[float]]:
        """The engine's log-probability of each given completion token (teacher forcing through prompt log-probs)."""
        from vllm import SamplingParams

        full = [list(p) + list(c) for p, c in zip(prompts, completions)]
        outputs = self.llm.generate(self.rollout_prompts(full, audio),
                                    sampling_params=SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0),
                                    use_tqdm=False)
        self.check_expansion(full, outputs)
        scores = []
        for output, completion in zip(outputs, completions):
            tail = output.prompt_logprobs[-len(completion):]
            scores.append([step[token].logprob for step, token in zip(tail, completion)])
        return scores

    def close(self) -> None:
        """Shut the engine down and release vLLM's process-wide parallel state (another engine, or a model built in
        a one-process "cluster", may then be started in this process). A second call does nothing."""
        import gc

        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        if getattr(self, "llm", None) is None:
            return
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()
        destroy_model_parallel()
        destroy_distributed_environment()

    def generate(self, *args, **kwargs):
        raise RuntimeError("AudioVLLMGeneration.generate would drop the clips; the audio trainer calls "
                           "generate_with_audio")
