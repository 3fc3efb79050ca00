"""DPO: pairs from the pairs file, the preference collator, audio in the loss, pair weights, the text-prior term,
and the margin rising on the tiny model."""

from __future__ import annotations

import datasets
import pytest
import torch
import torch.nn.functional as F
from test_grpo import reasoning_records

from emoreason.data.schema import UnsafePathError, write_records


@pytest.fixture(scope="module")
def pairs_file(synth_corpus, tmp_path_factory):
    _, pairs = reasoning_records(synth_corpus)
    return write_records(pairs, tmp_path_factory.mktemp("dpo-pairs") / "pairs.jsonl"), synth_corpus.parent


def make_trainer(model_dir, rows, data_root, tmp_path, **config):
    from emoreason.modeling import load_pretrained
    from emoreason.train.dpo import EmoReasonDPOConfig
    from emoreason.train.dpo_trainer import AudioDPOTrainer

    model, processor = load_pretrained(model_dir)
    options = dict(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=2, max_steps=1, learning_rate=1e-3,
                   report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, beta=0.1, seed=0)
    options.update(config)
    return AudioDPOTrainer(model=model, args=EmoReasonDPOConfig(**options),
                           train_dataset=datasets.Dataset.from_list(rows), processing_class=processor,
                           data_root=str(data_root))


def test_load_pairs_expands_rejected_responses_with_kind_weights(pairs_file, tmp_path):
    from emoreason.data.schema import read_records
    from emoreason.train.dpo import load_pairs

    path, root = pairs_file
    train = [r for r in read_records(path) if r.split == "train"]
    rows = load_pairs(str(path), str(root), "train", kind_weights={"wrong_emotion": 0.5, "spurious_cue": 0.0})
    assert len(rows) == 2 * len(train)  # spurious_cue weighs 0: dropped
    first = [r for r in rows if r["clip_id"] == train[0].id]
    assert [(r["kind"], r["pair_weight"]) for r in first] == [("hallucinated_cue", 1.0), ("wrong_emotion", 0.5)]
    assert all(r["chosen"] == train[0].response and r["rejected"] != r["chosen"] for r in first)
    assert len(load_pairs(str(path), str(root), "train", max_rejected=1)) == len(train)

    bad = train[0]
    bad.audio = "../outside.wav"
    write_records([bad], tmp_path / "bad.jsonl")
    with pytest.raises(UnsafePathError):
        load_pairs(str(tmp_path / "bad.jsonl"), str(root), "train")
    bad.audio, bad.meta = train[1].audio, {"rejected": [{"kind": "wrong_emotion"}]}
    write_records([bad], tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="has no text"):
        load_pairs(str(tmp_path / "empty.jsonl"), str(root), "train")
    with pytest.raises(ValueError, match="no record"):
        load_pairs(str(path), str(root), "validation", kind_weights={k: 0 for k in
                                                                     ("hallucinated_cue", "wrong_emotion",
                                                                      "spurious_cue")})


def test_preference_collator_puts_chosen_rows_then_rejected_rows_with_audio_duplicated(pairs_file, tiny):
    from emoreason.train.dpo import load_pairs
    from emoreason.train.dpo_trainer import PreferenceCollator

    path, root = pairs_file
    _, processor = tiny
    rows = load_pairs(str(path), str(root), "train", kind_weights={"wrong_emotion": 0.5})[:3]
    batch = PreferenceCollator(processor, root)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "input_features", "input_features_mask",
                          "input_values", "input_values_mask", "pair_weight"}
    assert batch["input_ids"].shape[0] == batch["input_features"].shape[0] == batch["input_values"].shape[0] == 6
    assert torch.equal(batch["input_features"][:3], batch["input_features"][3:])
    assert batch["pair_weight"].tolist() == [r["pair_weight"] for r in rows]
    tokenizer = processor.tokenizer
    for i, row in enumerate(rows):
        for j, text in ((i, row["chosen"]), (i + 3, row["rejected"])):
            completion = batch["input_ids"][j][batch["completion_mask"][j].bool()]
            assert tokenizer.decode(completion).startswith(text)
            # The prompt of both rows holds this clip's expanded placeholders.
            n_audio = int((batch["input_ids"][j] == processor.audio_token_id).sum())
            assert n_audio == processor.num_audio_tokens(int(batch["input_values_mask"][j].sum()))
    assert not (batch["completion_mask"].bool() & (batch["input_ids"] == processor.audio_token_id)).any()


def _pair_loss(trainer, batch):
    trainer.model.eval()  # no dropout: the same batch gives the same loss
    return trainer.compute_loss(trainer.model, dict(batch))


def test_audio_reaches_the_dpo_loss(tiny_model_dir, pairs_file, tmp_path):
    from emoreason.train.dpo import load_pairs

    path, root = pairs_file
    rows = load_pairs(str(path), str(root), "train")[:2]
    trainer = make_trainer(tiny_model_dir, rows, root, tmp_path)
    batch = trainer.data_collator(rows)
    loss = _pair_loss(trainer, batch)
    generator = torch.Generator().manual_seed(0)
    noisy = dict(batch)
    noisy["input_values"] = torch.randn(batch["input_values"].shape, generator=generator) * batch["input_values_mask"]
    noisy["input_features"] = torch.randn(batch["input_features"].shape, generator=generator)
    # The reference also hears the new audio, so the loss only moves if the policy's log-probs depend on the clip:
    # perturb the policy first so that policy and reference differ.
    with torch.no_grad():
        for p in trainer.model.model.audio_encoder.projector.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    assert abs(_pair_loss(trainer, noisy).item() - _pair_loss(trainer, batch).item()) > 1e-6
    assert loss.item() == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the start: -log sigmoid(0)
    no_audio = {k: v for k, v in batch.items() if not k.startswith("input_") or k == "input_ids"}
    with pytest.raises(RuntimeError, match="no audio"):
        _pair_loss(trainer, no_audio)


def test_pair_weights_scale_each_pairs_gradient(tiny_model_dir, pairs_file, tmp_path):
    from emoreason.train.dpo import load_pairs

    path, root = pairs_file
    rows = load_pairs(str(path), str(root), "train")[:2]
    trainer = make_trainer(tiny_model_dir, rows, root, tmp_path)
    with torch.no_grad():  # move the policy off the reference so that the gradients are not all alike
        for p in trainer.model.model.audio_encoder.projector.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def projector_grad(examples, weights):
        batch = trainer.data_collator([dict(e, pair_weight=w) for e, w in zip(examples, weights)])
        trainer.model.zero_grad()
        _pair_loss(trainer, batch).backward()
        return torch.cat([p.grad.flatten() for p in trainer.model.model.audio_encoder.projector.parameters()])

    only_first = projector_grad(rows[:1], [1.0])
    weighted = projector_grad(rows, [1.0, 0.0])
    assert torch.allclose(weighted, 0.5 * only_first, atol=1e-6, rtol=1e-4)  # mean over 2 pairs, second weighs 0
    assert not torch.allclose(projector_grad(rows, [1.0, 1.0]), weighted)


def test_text_prior_reduces_the_margin_by_gamma_times_the_text_only_margin(tiny_model_dir, pairs_file, tmp_path):
    from emoreason.train.dpo import load_pairs

    path, root = pairs_file
    rows = load_pairs(str(path), str(root), "train")[:1]
    trainer = make_trainer(tiny_model_dir, rows, root, tmp_path)
    with torch.no_grad():
        for p in trainer.model.model.audio_encoder.projector.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = trainer.data_collator(rows)
    trainer.text_prior_gamma = 0.0
    plain_loss = _pair_loss(trainer, batch)
    plain_margin = trainer._metrics["eval"]["rewards/margins"][-1]  # beta * (chosen - rejected log-ratio)
    assert plain_loss.item() == pytest.approx(-F.logsigmoid(torch.tensor(plain_margin)).item(), rel=1e-4)

    text_chosen, text_rejected = trainer.text_only_logps(trainer.model, batch)
    text_margin = (text_chosen - text_rejected).item()
    assert text_margin != 0.0
    gamma = 0.05
    trainer.text_prior_gamma = gamma
    debiased_loss = _pair_loss(trainer, batch)
    expected = -F.logsigmoid(torch.tensor(plain_margin - gamma * text_margin)).item()
    assert debiased_loss.item() == pytest.approx(expected, rel=1e-4)
    metrics = trainer._metrics["eval"]
    assert metrics["rewards/margins"][-1] == pytest.approx(plain_margin, abs=1e-4)  # reported without the prior
    assert metrics["rewards/debiased_margins"][-1] == pytest.approx(plain_margin - gamma * text_margin, abs=1e-4)
    assert metrics["text_prior/margin"][-1] == pytest.approx(text_margin, rel=1e-4)
    # The text-only pass really has no audio: it differs from the pass with audio.
    with torch.no_grad():
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        inputs = {k: v for k, v in batch.items() if k not in ("completion_mask", "pair_weight")}
        with_audio = trainer.model(**inputs, labels=labels, fused_lm_head=True).log_probs.sum(1)
    assert not torch.allclose(with_audio[:1], text_chosen)


@pytest.mark.slow
def test_dpo_raises_the_chosen_minus_rejected_margin(tiny_model_dir, pairs_file, tmp_path):
    from emoreason.train.dpo import load_pairs

    path, root = pairs_file
    rows = load_pairs(str(path), str(root), "train", max_records=4)  # 4 clips x 3 rejected kinds
    trainer = make_trainer(tiny_model_dir, rows, root, tmp_path, max_steps=12, learning_rate=2e-3,
                           per_device_train_batch_size=4, per_device_eval_batch_size=12, text_prior_gamma=0.01)
    eval_rows = datasets.Dataset.from_list(rows)
    before = trainer.evaluate(eval_rows)
    trainer.train()
    after = trainer.evaluate(eval_rows)
    print(f"DPO margin {before['eval_rewards/margins']:.3f} -> {after['eval_rewards/margins']:.3f}, "
          f"accuracy {before['eval_rewards/accuracies']:.2f} -> {after['eval_rewards/accuracies']:.2f}, "
          f"log-prob margin {before['eval_logps/chosen'] - before['eval_logps/rejected']:.2f} -> "
          f"{after['eval_logps/chosen'] - after['eval_logps/rejected']:.2f}")
    assert before["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-3)  # policy == reference; float noise only
    assert after["eval_rewards/margins"] > 0.5
    assert after["eval_rewards/accuracies"] > 0.75


@pytest.mark.parametrize("model", ["tiny-cpu", "qwen2.5-7b-whisper-wavlm", "llama3.1-8b-whisper-hubert"])
def test_dpo_recipes_parse(model, tmp_path):
    from pathlib import Path

    from emoreason.train.dpo import make_parser

    recipe = Path(__file__).resolve().parents[1] / "recipes" / model / "dpo.yaml"
    _, training, model_args = make_parser().parse_args_and_config(
        ["--config", str(recipe), "--data_root", str(tmp_path), "--use_cpu", "true", "--bf16", "false",
         "--output_dir", str(tmp_path / "out")])
    assert training.remove_unused_columns is False
    assert set(training.rejected_kind_weights) == {"hallucinated_cue", "wrong_emotion", "spurious_cue"}
    assert training.text_prior_gamma > 0 and training.beta > 0 and model_args.model_name_or_path
    with pytest.raises(ValueError, match="text_prior_gamma"):
        make_parser().parse_args_and_config(["--config", str(recipe), "--data_root", str(tmp_path), "--use_cpu",
                                             "true", "--bf16", "false", "--text_prior_gamma", "-1"])


@pytest.mark.slow
@pytest.mark.parametrize("launch_config", ["ddp", "zero2"])
def test_dpo_entry_point_under_accelerate_launch(launch_config, tiny_model_dir, pairs_file, tmp_path):
    import json

    from test_grpo import LAUNCH_CONFIGS, launch

    path, root = pairs_file
    out = tmp_path / "dpo"
    launch("dpo", LAUNCH_CONFIGS[launch_config], [
        "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), "--train_records", str(path),
        "--data_root", str(root), "--max_steps", "2", "--per_device_train_batch_size", "2", "--save_strategy", "no",
        "--max_train_records", "4", "--text_prior_gamma", "0.01",
        "--rejected_kind_weights", '{"wrong_emotion": 0.5}',
    ])
    assert (out / "model.safetensors").is_file() and (out / "processor_config.json").is_file()
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "rewards/margins" in h]
    assert [h["step"] for h in steps] == [1, 2]
    assert all("text_prior/margin" in h for h in steps)


def test_dpo_from_an_sft_adapter_uses_the_adapter_with_its_fitted_normalisation_as_reference(
        tiny_model_dir, pairs_file, tmp_path):
    """An SFT adapter with fitted feature statistics on a base saved before the fit: the reference ("ref" adapter)
    projector equals the policy's, buffers included, so the reference log-probs equal the policy's at step 0."""
    import math

    from test_grpo import assert_reference_projector_is_the_policys, fitted_sft_adapter

    from emoreason.train.common import EmoReasonModelArguments, get_model, get_processor
    from emoreason.train.dpo import EmoReasonDPOConfig, load_pairs
    from emoreason.train.dpo_trainer import AudioDPOTrainer

    path, root = pairs_file
    rows = load_pairs(str(path), str(root), "train")[:2]
    fitted_sft_adapter(tiny_model_dir, tmp_path / "adapter")
    model_args = EmoReasonModelArguments(model_name_or_path=str(tmp_path / "adapter"))
    model, processor = get_model(model_args), get_processor(model_args)
    args = EmoReasonDPOConfig(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=2, max_steps=1,
                              report_to="none", use_cpu=True, bf16=False, save_strategy="no", beta=0.1, seed=0)
    trainer = AudioDPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                              processing_class=processor, data_root=str(root))
    assert trainer.ref_model is None and "ref" in model.peft_config
    assert_reference_projector_is_the_policys(model)
    batch = trainer.data_collator(rows)
    loss = _pair_loss(trainer, batch)
    metrics = trainer._metrics["eval"]  # _pair_loss runs the model in eval mode
    # policy == reference: every implicit reward is 0 and the loss is -log sigmoid(0) = log 2.
    assert metrics["rewards/chosen"][-1] == pytest.approx(0.0, abs=1e-6)
    assert metrics["rewards/rejected"][-1] == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
