"""vLLM's real engine (the CPU build) serving the tiny checkpoint through our plugin, against the built-in server.

ONE engine per test run (the session fixture ``vllm_server`` in conftest.py, started with ``emoreason serve --backend
vllm``); the reference is the built-in transformers server on the same checkpoint, in the training environment.
Both speak OpenAI's chat API, so every request here is posted as plain JSON to both.
"""

from __future__ import annotations

import base64
import io
import json
import math
import subprocess
import urllib.error
import urllib.request

import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, TRAIN_PYTHON, needs_engine, needs_train_env

pytestmark = [needs_engine, pytest.mark.slow, pytest.mark.timeout(1800)]

# Greedy log-probabilities may differ by float32 rounding only: both sides compute in float32 from the same weights,
# but vLLM fuses q/k/v and gate/up into single matmuls, runs its own paged-attention CPU kernel and sums in another
# order, so each logit differs by ~1e-6 relative and log-softmax over the 1k-token vocabulary by ~1e-5 absolute
# (measured: see docs/vllm.md). 1e-3 is 100x that noise, yet 20x below the smallest change a real fault makes: the
# same prompt with another clip moves the first token's log-prob by 2e-2 or more (test_audio_is_live checks it), and
# an un-normalised or mis-aligned audio feature moves it further.
LOGPROB_ATOL = 1e-3
SECONDS = (0.6, 1.7, 3.1, 5.3)  # clips of different lengths: 10 to 67 `<audio>` tokens with stack factor 4


def clip(seconds: float, seed: int) -> np.ndarray:
    """A gliding tone with noise and a pause: structure for both encoders, different for each seed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16_000 * seconds)) / 16_000
    f0 = 110 + 60 * seed + 80 * t / seconds
    wave = 0.3 * np.sin(2 * np.pi * np.cumsum(f0) / 16_000) + 0.03 * rng.standard_normal(t.shape)
    wave[(t > 0.4 * seconds) & (t < 0.5 * seconds)] *= 0.05
    return wave.astype(np.float32)


def wav_bytes(wave: np.ndarray, sample_rate: int = 16_000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wave, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def audio_part(raw: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(raw).decode(), "format": fmt}}


def chat_body(raw: bytes, **params) -> dict:
    content = [audio_part(raw), {"type": "text", "text": "What emotion does the speaker express?"}]
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **params}


def post(url: str, body: dict, timeout: float = 600) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def ok(url: str, body: dict) -> dict:
    status, answer = post(url, body)
    assert status == 200, answer
    return answer


def token_logprobs(choice: dict) -> list[float]:
    return [entry["logprob"] for entry in choice["logprobs"]["content"]]


GREEDY = dict(temperature=0.0, max_tokens=24, logprobs=True, top_logprobs=2)


@pytest.fixture(scope="module", autouse=True)
def _engine_stops_with_this_module():
    """All tests of the served engine live here: stop it when they are done, so that modules after this one, which
    start engines of their own (colocated GRPO rollouts), never share the CPU with it."""
    yield
    from conftest import STARTED_ENGINES

    for server in STARTED_ENGINES:
        server.stop()


@pytest.fixture(scope="module")
def clips() -> list[bytes]:
    return [wav_bytes(clip(seconds, seed)) for seed, seconds in enumerate(SECONDS)]


@pytest.fixture(scope="module")
def greedy_answers(vllm_server, builtin_server, clips):
    """(vLLM answer, built-in answer) per clip, greedy with log-probs."""
    return [(ok(vllm_server.url, chat_body(raw, **GREEDY)), ok(builtin_server.url, chat_body(raw, **GREEDY)))
            for raw in clips]


@needs_train_env
def test_greedy_output_matches_the_builtin_server(greedy_answers):
    worst = 0.0
    for vllm_answer, reference in greedy_answers:
        got, want = vllm_answer["choices"][0], reference["choices"][0]
        assert vllm_answer["usage"]["prompt_tokens"] == reference["usage"]["prompt_tokens"]
        assert vllm_answer["usage"]["completion_tokens"] == reference["usage"]["completion_tokens"]
        assert got["message"]["content"] == want["message"]["content"]
        assert got["finish_reason"] == want["finish_reason"]
        got_lp, want_lp = token_logprobs(got), token_logprobs(want)
        assert len(got_lp) == len(want_lp) == vllm_answer["usage"]["completion_tokens"]
        assert all(math.isfinite(x) for x in got_lp)
        np.testing.assert_allclose(got_lp, want_lp, rtol=0, atol=LOGPROB_ATOL)
        # The runner-up agrees too (top_logprobs=2), not only the chosen token. Compared by log-prob: the two servers
        # spell a token that is a partial UTF-8 sequence differently ("" vs "\ufffd").
        for g, w in zip(got["logprobs"]["content"], want["logprobs"]["content"]):
            np.testing.assert_allclose([t["logprob"] for t in g["top_logprobs"]],
                                       [t["logprob"] for t in w["top_logprobs"]], rtol=0, atol=LOGPROB_ATOL)
        worst = max(worst, float(np.max(np.abs(np.subtract(got_lp, want_lp)))))
    print(f"\nmax |logprob(vLLM) - logprob(built-in)| over {len(greedy_answers)} clips: {worst:.2e}")


def test_prompt_tokens_grow_with_the_clip(greedy_answers):
    """The audio costs what it lasts in vLLM too: longer clips, more prompt tokens (the plugin's token count)."""
    from emoreason.data.audio_tokens import num_audio_tokens

    prompt_tokens = [answer["usage"]["prompt_tokens"] for answer, _ in greedy_answers]
    expected = [num_audio_tokens(int(16_000 * s), 4) for s in SECONDS]
    assert np.diff(prompt_tokens).tolist() == np.diff(expected).tolist()


def test_audio_is_live(vllm_server, greedy_answers, clips):
    """Same text prompt, different clips: different greedy outputs or first-token log-probs; a control (the same
    clip twice) gives identical ones."""
    firsts = [(a["choices"][0]["message"]["content"], token_logprobs(a["choices"][0])[0]) for a, _ in greedy_answers]
    for (text_a, lp_a), (text_b, lp_b) in zip(firsts, firsts[1:]):
        assert text_a != text_b or abs(lp_a - lp_b) > 20 * LOGPROB_ATOL
    again = ok(vllm_server.url, chat_body(clips[0], **GREEDY))
    assert again["choices"][0]["message"]["content"] == firsts[0][0]
    assert token_logprobs(again["choices"][0]) == pytest.approx(token_logprobs(greedy_answers[0][0]["choices"][0]),
                                                                abs=1e-5)


@pytest.mark.parametrize("server_name", ["vllm_server", "builtin_server"])
def test_n_and_seed_behave_the_same_on_both_servers(server_name, request, clips):
    """n choices come back; a seeded sampled request repeats exactly; another seed (or no seed) changes it."""
    server = request.getfixturevalue(server_name)
    sampled = dict(temperature=1.0, top_p=1.0, max_tokens=16, n=3)
    first = ok(server.url, chat_body(clips[1], seed=1234, **sampled))
    texts = [c["message"]["content"] for c in first["choices"]]
    assert len(texts) == 3 and [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert len(set(texts)) > 1  # n samples, not one sample copied n times
    repeat = ok(server.url, chat_body(clips[1], seed=1234, **sampled))
    assert [c["message"]["content"] for c in repeat["choices"]] == texts
    other = ok(server.url, chat_body(clips[1], seed=4321, **sampled))
    assert [c["message"]["content"] for c in other["choices"]] != texts


def _nan_wav() -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.full(8000, np.nan, dtype=np.float32), 16_000, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


BAD_AUDIO = {
    "not_audio": (b"this is not a sound file at all" * 10, "wav"),
    "truncated_wav": (wav_bytes(clip(1.0, 9))[:30], "wav"),
    "nan_samples": (_nan_wav(), "wav"),
    "longer_than_the_encoder_window": (wav_bytes(clip(31.0, 3)), "wav"),
}


@pytest.mark.parametrize("case", sorted(BAD_AUDIO))
def test_bad_audio_gets_a_4xx_with_the_reason_and_the_engine_keeps_serving(vllm_server, clips, case):
    raw, fmt = BAD_AUDIO[case]
    body = {"model": "tiny", "max_tokens": 4, "messages": [
        {"role": "user", "content": [audio_part(raw, fmt), {"type": "text", "text": "Emotion?"}]}]}
    status, answer = post(vllm_server.url, body)
    assert 400 <= status < 500, (status, answer)
    message = json.dumps(answer).lower()
    assert "audio" in message or "nan" in message or "decode" in message or "sound" in message, answer
    assert vllm_server.alive()
    assert ok(vllm_server.url, chat_body(clips[0], **GREEDY))["choices"][0]["message"]["content"] == \
        ok(vllm_server.url, chat_body(clips[0], **GREEDY))["choices"][0]["message"]["content"]


@needs_train_env
def test_emoreason_eval_runs_a_suite_against_the_engine(vllm_server, tmp_path):
    """`emoreason eval` (the training environment's CLI, as users run it) evaluates a 4-record suite on the engine
    and writes its report, with every request answered."""
    import yaml

    from emoreason.data.schema import EmotionRecord, Vote, write_records

    records = []
    for i, (label, seconds) in enumerate(zip(["neutral", "happy", "sad", "angry"], SECONDS)):
        (tmp_path / f"clip{i}.wav").write_bytes(wav_bytes(clip(seconds, 10 + i)))
        records.append(EmotionRecord(
            id=f"r{i}", audio=f"clip{i}.wav", duration=seconds, corpus="engine-test", split="test",
            speaker=f"s{i % 2}", gender="female" if i % 2 else "male", transcript="The train leaves in ten minutes.",
            label=label, votes=[Vote(rater="a", emotion=label), Vote(rater="b", emotion=label)],
            distribution={label: 1.0}))
    manifest = write_records(records, tmp_path / "records.jsonl")
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "engine", "records": str(manifest), "split": "test", "labels": ["neutral", "happy", "sad", "angry"],
        "prompts": str(REPO / "eval" / "prompts" / "emotion.yaml"), "max_tokens": 16, "concurrency": 4,
        "timeout": 300, "retries": 1,
        "strategies": ["direct", {"name": "self_consistency", "n": 2, "temperature": 0.8}],
        "metrics": ["classification", "distribution"], "group_by": ["gender"]}))
    out = tmp_path / "out"
    emoreason = TRAIN_PYTHON.parent / "emoreason"
    result = subprocess.run([str(emoreason), "eval", "--suite", str(suite), "--endpoint", vllm_server.url,
                             "--model", "tiny", "--out", str(out), "--no-progress"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report_file = out / "report.json"
    assert report_file.is_file(), sorted(p.name for p in out.iterdir())
    report = json.loads(report_file.read_text())
    text = json.dumps(report)
    assert "direct" in text and "self_consistency" in text
    assert "engine" in text
