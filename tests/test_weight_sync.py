"""The vLLM weight sync (emoreason.train.vllm_rollouts.policy_state): what the engine gets after each optimizer step.

No vLLM here: the sync's tensors come from ``policy_state``, and ``sync_weights`` is driven with a stand-in engine that
records what ``load_weights`` was given (tests_vllm/test_grpo_vllm.py runs the real engine in the vLLM environment).
The sync used to merge LoRA into the live weights and unmerge it (PEFT's merge_adapter / unmerge_adapter, as TRL
does): in bfloat16 that is not a round trip, and the frozen base drifted at every sync.
"""

from __future__ import annotations

import copy

import pytest
import torch

SYNCS = 5


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern, so that equality is bit-identity (-0.0 vs 0.0, NaN payloads)."""
    if tensor.is_floating_point():
        return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])
    return tensor


def lora_policy(model_dir, dtype: torch.dtype, **lora):
    """The tiny model with LoRA on its language model, trained-looking factors (lora_B is 0 at initialisation, which
    would make every merge trivially exact), a projector copy that differs from the base's, cast to ``dtype``."""
    from emoreason.modeling import load_pretrained
    from emoreason.modeling.lora import apply_lora

    model, _ = load_pretrained(model_dir)
    policy = apply_lora(model, r=4, alpha=8, dropout=0.05, **lora)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
            elif "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.1 * torch.rand(parameter.shape, generator=generator))
        projector = policy.get_base_model().model.audio_encoder.projector.modules_to_save["default"]
        for parameter in projector.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    return policy.to(dtype)


def fp32_merged_reference(policy) -> dict[str, torch.Tensor]:
    """PEFT's own merge, in float32, of a copy of ``policy``: ``merge_and_unload`` gives the base model with the
    adapter merged and the active projector copy in place, under the checkpoint's names."""
    merged = copy.deepcopy(policy).float().merge_and_unload()
    return {name: tensor.clone() for name, tensor in merged.state_dict().items()}


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_syncs_leave_the_bf16_policy_bit_identical_and_send_the_fp32_merge(tiny_model_dir, variant):
    from emoreason.train.vllm_rollouts import policy_state

    options = {"rslora": {"use_rslora": True}, "dora": {"use_dora": True}}.get(variant, {})
    policy = lora_policy(tiny_model_dir, torch.bfloat16, **options)
    before = {name: bits(tensor).clone() for name, tensor in policy.state_dict().items()}

    sent = [dict(policy_state(policy)) for _ in range(SYNCS)]

    after = policy.state_dict()
    drifted = [name for name, tensor in after.items() if not torch.equal(bits(tensor), before[name])]
    assert not drifted, f"{len(drifted)} tensors of the policy changed over {SYNCS} syncs, e.g. {drifted[:3]}"
    for other in sent[1:]:  # every sync sends the same tensors
        assert all(torch.equal(bits(other[name]), bits(tensor)) for name, tensor in sent[0].items())

    synced = sent[0]
    reference = fp32_merged_reference(policy)
    assert synced.keys() == reference.keys()  # the checkpoint's names: no LoRA factors, no "ref"/original copies
    adapted = [name for name in synced if ".language_model." in name and name.endswith("proj.weight")]
    assert adapted
    exact = total = 0
    for name, tensor in synced.items():
        expected = reference[name].to(tensor.dtype)
        if name in adapted:
            assert tensor.dtype == torch.bfloat16
            # float32 W + scaling * B @ A, rounded once to bfloat16: equal to the float32 merge's rounding, or one
            # bfloat16 step (2**-7 relative) from it where the two float32 sums round to neighbours
            torch.testing.assert_close(tensor.float(), expected.float(), rtol=2 ** -7, atol=0, msg=name)
            exact += int((bits(tensor) == bits(expected)).sum())
            total += tensor.numel()
        else:
            assert torch.equal(tensor, expected), name  # everything else is the policy's own tensor
    print(f"{variant}: {exact / total:.4%} of merged bf16 elements bit-equal to the fp32 merge's rounding")
    assert exact / total > 0.99
    # The adapter matters (else the comparison above proves nothing): the merged weights differ from the base's.
    base = {name.removeprefix("base_model.model.").replace(".base_layer.", "."): tensor
            for name, tensor in after.items() if ".base_layer." in name}
    assert all(not torch.equal(synced[name], base[name]) for name in adapted)


def test_dora_fp32_sync_matches_peft_merge(tiny_model_dir):
    """DoRA merges as PEFT merges it (magnitude / column norm of W + delta), checked in float32."""
    from emoreason.train.vllm_rollouts import policy_state

    policy = lora_policy(tiny_model_dir, torch.float32, use_dora=True)
    synced, reference = dict(policy_state(policy)), fp32_merged_reference(policy)
    assert synced.keys() == reference.keys()
    for name, tensor in synced.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-6, msg=name)


def test_sync_weights_hands_the_engine_the_merged_state_and_leaves_the_policy_alone(tiny_model_dir):
    """The engine-facing path (``AudioVLLMGeneration.sync_weights``) with a stand-in for vLLM's ``LLM``: the engine's
    ``load_weights`` gets the policy's full state, merged, in the engine's dtype; the policy is untouched."""
    from accelerate import Accelerator
    from trl.distributed import DistributedBackend

    from emoreason.train.vllm_rollouts import AudioVLLMGeneration, policy_state

    class StandInEngine:
        def __init__(self):
            self.loaded, self.resets = {}, 0
            self.llm_engine = self

        def apply_model(self, fn):
            return fn(self)

        def load_weights(self, weights):
            self.loaded.update((name, tensor.clone()) for name, tensor in weights)

        def reset_prefix_cache(self):
            self.resets += 1

        def reset_encoder_cache(self):
            self.resets += 1

    policy = lora_policy(tiny_model_dir, torch.bfloat16)
    before = {name: bits(tensor).clone() for name, tensor in policy.state_dict().items()}
    accelerator = Accelerator(cpu=True)
    generation = object.__new__(AudioVLLMGeneration)  # everything but the engine start
    generation.model, generation.accelerator, generation.dtype = policy, accelerator, torch.bfloat16
    generation._dist, generation.llm = DistributedBackend(accelerator), StandInEngine()
    for _ in range(SYNCS):
        generation.sync_weights()
    assert all(torch.equal(bits(tensor), before[name]) for name, tensor in policy.state_dict().items())
    assert generation.llm.resets == 2 * SYNCS
    expected = dict(policy_state(policy))
    assert generation.llm.loaded.keys() == expected.keys()
    assert all(torch.equal(generation.llm.loaded[name], tensor) for name, tensor in expected.items())


def test_a_policy_with_its_adapter_merged_in_is_refused(tiny_model_dir):
    from emoreason.train.vllm_rollouts import policy_state

    policy = lora_policy(tiny_model_dir, torch.float32)
    policy.merge_adapter()
    with pytest.raises(RuntimeError, match="merged into their weights"):
        next(policy_state(policy))
