"""Every request our evaluator and clients send validates against vLLM's own chat-completion request model."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from conftest import needs_vllm

pytestmark = needs_vllm

MODEL = "emoreason-tiny"


@pytest.fixture(scope="module")
def wav_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("audio") / "clip.wav"
    sf.write(path, (0.1 * np.random.default_rng(0).standard_normal(24_000)).astype(np.float32), 16_000)
    return path


def body(request: dict, extra_body: dict | None = None) -> dict:
    """The JSON the `openai` client posts for ``chat.completions.create(model=..., extra_body=..., **request)``."""
    return {"model": MODEL, **request, **(extra_body or {})}


def evaluator_requests(wav_file) -> dict[str, dict]:
    """The request shapes of emoreason.eval.strategies (and the smoke script), one per code path."""
    from emoreason.data.conversation import input_audio_part as encode_audio_part

    raw = wav_file.read_bytes()
    parts = {
        "input_audio": encode_audio_part(wav_file),
        "audio_url_file": {"type": "audio_url", "audio_url": {"url": wav_file.as_uri()}},
        "audio_url_data": {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,"
                                                              + encode_audio_part(raw)["input_audio"]["data"]}},
    }
    system = {"role": "system", "content": "You are an expert in emotion recognition from speech."}

    def user(part):
        return [system, {"role": "user", "content": [part, {"type": "text", "text": "Which emotion? Reason first."}]}]

    requests = {f"direct_{name}": body({"messages": user(part), "temperature": 0.0, "max_tokens": 64})
                for name, part in parts.items()}
    requests["self_consistency"] = body({"messages": user(parts["input_audio"]), "n": 8, "temperature": 0.8,
                                         "top_p": 0.95, "max_tokens": 256, "logprobs": True})
    requests["smoke_sampling"] = body({"messages": user(parts["audio_url_data"]), "n": 2, "temperature": 1.0,
                                       "top_p": 0.9, "seed": 1234, "stop": ["</answer>"], "logprobs": True,
                                       "top_logprobs": 2, "max_tokens": 32})
    partial = user(parts["input_audio"]) + [{"role": "assistant", "content": "<think>\nThe pitch is high"}]
    requests["budget_forcing"] = body({"messages": partial, "temperature": 0.0, "max_tokens": 200,
                                       "stop": ["</think>"]},
                                      extra_body={"continue_final_message": True, "add_generation_prompt": False})
    requests["refine_text_only"] = body({"messages": [system, {"role": "user", "content": "Check your answer."}],
                                         "temperature": 0.0, "max_tokens": 64, "seed": 0})
    return requests


def test_every_request_shape_validates(wav_file):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    requests = evaluator_requests(wav_file)
    assert len(requests) == 7
    for name, payload in requests.items():
        request = ChatCompletionRequest.model_validate(payload)
        for field in ("n", "temperature", "top_p", "max_tokens", "seed", "stop", "logprobs", "top_logprobs",
                      "continue_final_message", "add_generation_prompt"):
            if field in payload:
                assert getattr(request, field) == payload[field], (name, field)
        params = request.to_sampling_params(max_tokens=payload["max_tokens"], default_sampling_params={})
        assert params.n == payload.get("n", 1), name
        assert params.seed == payload.get("seed"), name
        assert params.stop == payload.get("stop", []), name
        if payload.get("logprobs"):
            assert params.logprobs == payload.get("top_logprobs", 0), name


def test_audio_parts_parse_into_clips(wav_file, model_config):
    """vLLM's chat layer turns each audio part shape into one clip (file:// needs --allowed-local-media-path)."""
    from vllm.renderers.chat_utils import parse_chat_messages

    model_config.allowed_local_media_path = str(wav_file.parent)
    for name, payload in evaluator_requests(wav_file).items():
        if not name.startswith("direct_"):
            continue
        conversation, mm_data, _ = parse_chat_messages(payload["messages"], model_config, content_format="string")
        assert len(mm_data["audio"]) == 1, name
        wav, rate = mm_data["audio"][0]
        assert (len(wav), rate) == (24_000, 16_000), name
        assert conversation[-1]["content"].startswith("<audio>"), name


def test_malformed_requests_are_refused(wav_file):
    from pydantic import ValidationError
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.exceptions import VLLMValidationError

    good = evaluator_requests(wav_file)["smoke_sampling"]
    for broken in ({**good, "logprobs": False}, {**good, "top_logprobs": "two"}, {**good, "n": "many"}):
        with pytest.raises((ValidationError, VLLMValidationError)):
            ChatCompletionRequest.model_validate(broken)
