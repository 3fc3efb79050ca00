"""The built-in server on loopback (tiny model) answered through the official `openai` client.

The tiny model has random weights, so these tests check mechanics: audio accepted in every transport, `n`, seeds,
logprobs, usage, stop strings, batching of concurrent requests, the API key and the 400s for bad input.
"""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openai
import pytest
import soundfile as sf

from emoreason.data.schema import read_records
from emoreason.serve.app import create_app
from emoreason.data.conversation import input_audio_part
from emoreason.serve.background import BackgroundServer
from emoreason.serve.engine import TransformersEngine

API_KEY = "test-key"
MODEL = "tiny"


@pytest.fixture(scope="module")
def clips(synth_corpus) -> list[Path]:
    records = read_records(synth_corpus)
    return [r.audio_path(synth_corpus.parent) for r in records[:3]]


@pytest.fixture(scope="module")
def server(tiny, synth_corpus):
    model, processor = tiny
    engine = TransformersEngine(model, processor, max_batch_rows=16, batch_wait_s=0.02)
    app = create_app(engine, MODEL, api_key=API_KEY, allowed_audio_root=str(synth_corpus.parent),
                     default_max_tokens=8)
    with BackgroundServer(app) as background:
        background.engine = engine
        yield background


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def audio_message(part: dict, text: str = "What emotion does the speaker express?") -> list[dict]:
    return [{"role": "user", "content": [part, {"type": "text", "text": text}]}]


def encoded(path: Path, fmt: str) -> bytes:
    wav, rate = sf.read(path, dtype="float32")
    buffer = io.BytesIO()
    sf.write(buffer, wav, rate, format=fmt.upper())
    return buffer.getvalue()


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    import httpx

    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # open without a key, for load balancers


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3"])
def test_input_audio_formats(client, clips, fmt):
    response = client.chat.completions.create(
        model=MODEL, messages=audio_message(input_audio_part(encoded(clips[0], fmt), fmt)), max_tokens=4,
        temperature=0,
    )
    choice = response.choices[0]
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    # The audio became `<audio>` tokens: the prompt is far longer than its text alone.
    assert response.usage.prompt_tokens > 40
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_audio_urls_file_and_data(client, clips):
    data_url = "data:audio/wav;base64," + base64.b64encode(clips[0].read_bytes()).decode()
    file_url = clips[0].resolve().as_uri()
    answers = []
    for url in (data_url, file_url):
        response = client.chat.completions.create(
            model=MODEL, messages=audio_message({"type": "audio_url", "audio_url": {"url": url}}), max_tokens=6,
            temperature=0,
        )
        answers.append((response.choices[0].message.content, response.usage.prompt_tokens))
    assert answers[0] == answers[1]  # the same clip by either transport gives the same greedy answer


def test_audio_changes_the_answer_distribution(client, clips):
    logprobs = []
    for clip in clips[:2]:
        response = client.chat.completions.create(
            model=MODEL, messages=audio_message(input_audio_part(clip)), max_tokens=1, temperature=0,
            logprobs=True, top_logprobs=5,
        )
        logprobs.append([t.logprob for t in response.choices[0].logprobs.content[0].top_logprobs])
    assert not np.allclose(logprobs[0], logprobs[1])


def test_n_seed_and_logprobs(client, clips):
    request = dict(model=MODEL, messages=audio_message(input_audio_part(clips[1])), n=3, max_tokens=6,
                   temperature=1.0, seed=7, logprobs=True, top_logprobs=3)
    first = client.chat.completions.create(**request)
    second = client.chat.completions.create(**request)
    other = client.chat.completions.create(**{**request, "seed": 8})
    texts = [c.message.content for c in first.choices]
    assert len(first.choices) == 3 and [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in second.choices]  # same seed, same samples
    assert texts != [c.message.content for c in other.choices]
    completion = 0
    for choice in first.choices:
        tokens = choice.logprobs.content
        assert 1 <= len(tokens) <= 6
        completion += len(tokens)
        for token in tokens:
            assert token.logprob <= 0 and len(token.top_logprobs) == 3
            tops = [t.logprob for t in token.top_logprobs]
            assert tops == sorted(tops, reverse=True) and token.logprob <= tops[0] + 1e-6
    assert first.usage.completion_tokens == completion


def test_greedy_is_deterministic_and_stop_strings_cut(client, clips):
    messages = audio_message(input_audio_part(clips[2]))
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert again.choices[0].message.content == text
    if len(text) > 3:
        stop = text[2:4]
        cut = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, stop=[stop])
        assert cut.choices[0].message.content == text[: text.find(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_continue_final_message(client, clips):
    messages = audio_message(input_audio_part(clips[0]))
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    response = client.chat.completions.create(
        model=MODEL, messages=messages + [{"role": "assistant", "content": "<think>"}], max_tokens=4, temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    assert full.usage.prompt_tokens < response.usage.prompt_tokens  # the partial answer is part of the prompt


def test_concurrent_requests_are_batched(server, clips):
    engine = server.engine
    before_batches, before_rows = engine.batches_run, engine.rows_run

    async def run():
        async_client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        requests = [async_client.chat.completions.create(model=MODEL, messages=audio_message(input_audio_part(c)),
                                                         max_tokens=4, temperature=0)
                    for c in clips * 2]
        try:
            return await asyncio.gather(*requests)
        finally:
            await async_client.close()

    responses = asyncio.run(run())
    assert len(responses) == 6 and all(r.choices for r in responses)
    assert engine.rows_run - before_rows == 6
    assert engine.batches_run - before_batches < 6
    # Identical requests in one batch get identical greedy answers.
    assert responses[0].choices[0].message.content == responses[3].choices[0].message.content


def test_api_key_required(server):
    anonymous = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()


@pytest.mark.parametrize(
    "part, reason",
    [
        ({"type": "input_audio", "input_audio": {"data": base64.b64encode(b"not audio at all").decode(),
                                                 "format": "wav"}}, "unreadable"),
        ({"type": "input_audio", "input_audio": {"data": "***", "format": "wav"}}, "base64"),
        ({"type": "audio_url", "audio_url": {"url": "file:///etc/hostname"}}, "outside the allowed audio root"),
        ({"type": "audio_url", "audio_url": {"url": "https://example.com/a.wav"}}, "not supported"),
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "unsupported content part"),
    ],
)
def test_bad_audio_is_a_400_with_the_reason(client, part, reason):
    with pytest.raises(openai.BadRequestError, match=reason):
        client.chat.completions.create(model=MODEL, messages=audio_message(part), max_tokens=2)


def test_bad_requests(client, clips):
    part = input_audio_part(clips[0])
    with pytest.raises(openai.BadRequestError, match="placeholder"):
        client.chat.completions.create(model=MODEL, messages=audio_message(part, "<audio> twice"), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="n"):
        client.chat.completions.create(model=MODEL, messages=audio_message(part), n=0, max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="other", messages=audio_message(part), max_tokens=2)


@pytest.mark.slow
def test_serve_cli_starts_and_answers(tiny_model_dir, clips):
    """`emoreason serve --model PATH --port 0` prints its address and answers the openai client."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "emoreason.cli", "serve", "--model", str(tiny_model_dir), "--port", "0",
         "--served-model-name", "cli-tiny", "--num-threads", "1", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url, deadline = None, time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            if "emoreason serve:" in line:
                url = line.rsplit(" on ", 1)[1].strip()
        assert url and url.startswith("http://127.0.0.1:"), "the server did not print its address"
        cli_client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        response = cli_client.chat.completions.create(model="cli-tiny", messages=audio_message(
            input_audio_part(clips[0])), max_tokens=3, temperature=0)
        assert response.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_text_only_and_audio_requests_batch_together(server, clips):
    async def run():
        async_client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        text_only = [{"role": "user", "content": "Describe the speaker's voice."}]
        try:
            return await asyncio.gather(
                async_client.chat.completions.create(model=MODEL, messages=text_only, max_tokens=3, temperature=0),
                async_client.chat.completions.create(model=MODEL, messages=audio_message(input_audio_part(clips[0])),
                                                     max_tokens=3, temperature=0),
            )
        finally:
            await async_client.close()

    text_response, audio_response = asyncio.run(run())
    assert text_response.usage.prompt_tokens < 30 < audio_response.usage.prompt_tokens


def test_vllm_backend_is_delegated_lazily(monkeypatch, tiny_model_dir):
    import types

    from emoreason.serve import cli

    seen = {}
    fake = types.ModuleType("emoreason.serve.vllm_launcher")
    fake.launch = lambda args: seen.setdefault("args", args) and 0
    monkeypatch.setitem(sys.modules, "emoreason.serve.vllm_launcher", fake)
    assert cli.main(["--model", str(tiny_model_dir), "--backend", "vllm", "--port", "8123"]) == 0
    assert seen["args"].port == 8123 and seen["args"].host == "127.0.0.1"
    assert seen["args"].served_model_name == Path(tiny_model_dir).resolve().name


def test_vllm_flags_reach_the_real_launcher(tiny_model_dir, capsys):
    """`emoreason serve --backend vllm --dry-run` parses the vLLM flags and prints the `vllm serve` command."""
    pytest.importorskip("emoreason.serve.vllm_launcher")
    from emoreason.serve import cli

    code = cli.main(["--model", str(tiny_model_dir), "--backend", "vllm", "--dry-run", "--vllm-bin", "/bin/true",
                     "--served-model-name", "tiny", "--port", "8123", "--tensor-parallel-size", "2"])
    printed = capsys.readouterr().out
    assert code == 0 and "serve" in printed and "--tensor-parallel-size 2" in printed
    assert "--port 8123" in printed and "--served-model-name tiny" in printed and "--host 127.0.0.1" in printed


def test_evaluator_against_the_builtin_server(server, synth_corpus, tmp_path):
    """The demo's path: a suite run against the real server (tiny model), strategies that need n, logprobs and
    continue_final_message included; the gibberish answers are invalid but every item is accounted for."""
    import yaml

    from emoreason.eval import run_suite

    suite = yaml.safe_load((Path(__file__).resolve().parents[1] / "eval/suites/synthetic.yaml").read_text())
    suite.update(max_tokens=6, strategies=["direct", {"name": "self_consistency", "n": 2},
                                           {"name": "best_of_n", "n": 2, "verifier": "loglik"},
                                           {"name": "budget_forcing", "min_thinking_tokens": 4,
                                            "max_thinking_tokens": 6, "answer_tokens": 3}])
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    report = run_suite(path, server.url + "/v1", MODEL, tmp_path / "out", records=synth_corpus,
                       data_root=synth_corpus.parent, api_key=API_KEY, limit=2, progress=False)
    assert set(report["strategies"]) == {"direct", "self_consistency", "best_of_n", "budget_forcing"}
    for name, result in report["strategies"].items():
        assert result["failures"] == [], name
        assert result["tokens"]["completion_per_item"] > 0, name
        assert sum(map(sum, result["metrics"]["classification"]["confusion_matrix"])) == 2, name
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "plots" / "reliability.png").is_file()


def test_a_failing_request_does_not_fail_its_batch(server, clips, monkeypatch):
    engine = server.engine
    real_generate = engine.generate

    def fragile_generate(requests):
        if any("BOOM" in r.prompt for r in requests):
            raise RuntimeError("cannot generate this one")
        return real_generate(requests)

    monkeypatch.setattr(engine, "generate", fragile_generate)

    async def run():
        async_client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        texts = ["What emotion?", "BOOM", "How does it sound?"]
        try:
            return await asyncio.gather(*(
                async_client.chat.completions.create(model=MODEL, messages=audio_message(
                    input_audio_part(clips[0]), text), max_tokens=3, temperature=0) for text in texts),
                return_exceptions=True)
        finally:
            await async_client.close()

    good, bad, also_good = asyncio.run(run())
    assert isinstance(bad, openai.InternalServerError) and "cannot generate this one" in str(bad)
    assert good.choices and also_good.choices


# -- issue 25: seeded rows batch; one rule for silent and too-short clips; non-ASCII keys are 401s ---------------------
def _concurrently(server, requests: list[dict]):
    async def run():
        async_client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(async_client.chat.completions.create(**r) for r in requests))
        finally:
            await async_client.close()

    return asyncio.run(run())


def test_seeded_requests_batch_and_keep_their_samples(server, clips):
    """The evaluator always sends a seed: 8 concurrent seeded requests must not cost 8 generate calls, and a seeded
    request samples the same completions alone and inside a batch of other requests."""
    engine = server.engine

    def request(clip, seed, n=1):
        return dict(model=MODEL, messages=audio_message(input_audio_part(clip)), max_tokens=6, temperature=1.0,
                    n=n, seed=seed)

    alone = _concurrently(server, [request(clips[0], 11, n=2)])[0]
    before = engine.batches_run
    crowd = _concurrently(server, [request(clips[0], 11, n=2)] + [request(clips[i % 3], 100 + i) for i in range(7)])
    assert engine.batches_run - before < 8  # one generate call for the lot (two if they arrive apart), not eight
    assert [c.message.content for c in crowd[0].choices] == [c.message.content for c in alone.choices]
    others = [crowd[i].choices[0].message.content for i in range(1, 8)]
    assert len(set(others)) > 1  # each row samples from its own generator


def _wav(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples.astype(np.float32), 16_000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


NO_SPEECH = {
    "silent_2s": (_wav(np.zeros(32_000)), "no speech"),
    "one_sample": (_wav(np.array([0.5])), "too short"),
    "dither_2s": (_wav(np.random.default_rng(0).normal(0, 10 ** (-75 / 20), 32_000)), "no speech"),
}


@pytest.mark.parametrize("name", list(NO_SPEECH))
def test_silent_and_too_short_clips_are_refused_by_the_rule_datagen_uses(client, tmp_path, name):
    from emoreason.data.schema import EmotionRecord
    from emoreason.datagen.acoustic import MIN_VOICED_SECONDS, SILENCE_FLOOR_DBFS
    from emoreason.datagen.acoustic_phase import AnalysisLimits, analyze_clip

    data, reason = NO_SPEECH[name]
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"}}
    with pytest.raises(openai.BadRequestError, match=reason) as refused:
        client.chat.completions.create(model=MODEL, messages=audio_message(part), max_tokens=2)
    (tmp_path / "clip.wav").write_bytes(data)
    record = EmotionRecord(id=name, audio="clip.wav", duration=1.0, corpus="c", label="happy")
    limits = AnalysisLimits(60.0, 500.0, 30.0, MIN_VOICED_SECONDS, SILENCE_FLOOR_DBFS)
    datagen_reason = analyze_clip(record, str(tmp_path), limits)["reason"]
    assert datagen_reason.split(": ", 1)[1] in str(refused.value)  # one rule, one reason, both stages


def test_a_speech_clip_passes_the_no_speech_rule(clips):
    from emoreason.data.audio import load_audio, silent_or_too_short

    assert all(silent_or_too_short(load_audio(c)) is None for c in clips)  # control: real speech is answered


@pytest.mark.parametrize("header", ["Bearer t\u00e9st-key", "Bearer \u2603", "B\u00e9arer test-key"])
def test_a_non_ascii_authorization_header_is_a_401(server, header):
    import httpx

    response = httpx.get(server.url + "/v1/models", headers={"Authorization": header.encode("utf-8")})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_a_non_ascii_api_key_is_checked_not_a_500(tiny):
    import httpx

    model, processor = tiny
    app = create_app(TransformersEngine(model, processor), MODEL, api_key="cl\u00e9-\u2603")
    with BackgroundServer(app) as background:
        wrong = httpx.get(background.url + "/v1/models", headers={"Authorization": "Bearer other"})
        right = httpx.get(background.url + "/v1/models",
                          headers={"Authorization": "Bearer cl\u00e9-\u2603".encode("utf-8")})
    assert wrong.status_code == 401 and right.status_code == 200
