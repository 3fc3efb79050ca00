"""The one OpenAI-endpoint client (:mod:`emoreason.data.endpoint`) against a local fake server: retries on what the
endpoint can fix, none on a wrong request, a clear error on a timeout, the key sent as Bearer, malformed and empty
replies caught; and the evaluator, the GRPO judge and the datagen teacher on top of it."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from emoreason.data.endpoint import (ChatEndpoint, EndpointError, MalformedReply, backoff_delay, empty_reply,
                                     transient_status)
from emoreason.testing.server import free_port  # a port nothing listens on: connections are refused


def completion(texts: list[str | None], body: dict, **extra) -> dict:
    return {"id": "x", "object": "chat.completion", "created": 0, "model": body.get("model", "m"),
            "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                        for i, t in enumerate(texts)],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}, **extra}


class FakeEndpoint:
    """A ThreadingHTTPServer on 127.0.0.1 whose replies come from ``script(body, headers, hit) -> (status, payload,
    headers)``; a str payload is sent as text/html. It records every request (path, headers, body)."""

    def __init__(self, script: Callable[[dict, dict, int], tuple]):
        self.script = script
        self.seen: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802 (http.server API)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                headers = {k.lower(): v for k, v in self.headers.items()}
                outer.seen.append({"path": self.path, "headers": headers, "body": body})
                status, payload, *rest = outer.script(body, headers, len(outer.seen))
                html = isinstance(payload, str)
                data = payload.encode() if html else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html" if html else "application/json")
                for key, value in (rest[0] if rest else {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeEndpoint:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def ok(body, headers, hit):
    return 200, completion([f"answer {k}" for k in range(body.get("n", 1))], body)


MESSAGES = [{"role": "user", "content": "hi"}]


def test_retries_a_503_then_returns_the_reply_with_every_choice_and_usage():
    def script(body, headers, hit):
        return (503, {"error": {"message": "warming up"}}) if hit == 1 else ok(body, headers, hit)

    with FakeEndpoint(script) as fake:
        client = ChatEndpoint(fake.url, "m", backoff=0.01, max_retries=2)
        reply = client.chat(messages=MESSAGES, n=3, logprobs=True)
    assert len(fake.seen) == 2 and client.stats["retries"] == 1 and client.stats["failures"] == 0
    assert [c["message"]["content"] for c in reply["choices"]] == ["answer 0", "answer 1", "answer 2"]
    assert reply["usage"]["completion_tokens"] == 2
    assert fake.seen[0]["path"] == "/v1/chat/completions" and fake.seen[0]["body"]["model"] == "m"
    assert fake.seen[0]["body"]["logprobs"] is True and fake.seen[0]["body"]["n"] == 3


def test_async_and_blocking_calls_share_the_policy():
    def script(body, headers, hit):
        return (429, {"error": {"message": "slow down"}}) if hit % 2 else ok(body, headers, hit)

    with FakeEndpoint(script) as fake:
        client = ChatEndpoint(fake.url, "m", backoff=0.01, concurrency=2)

        async def run():
            try:
                return await client.achat(messages=MESSAGES)
            finally:
                await client.aclose()

        reply = asyncio.run(run())
        assert client.chat(messages=MESSAGES)["choices"][0]["message"]["content"] == "answer 0"
    assert reply["choices"][0]["message"]["content"] == "answer 0"
    assert client.stats == {"requests": 4, "retries": 2, "failures": 0, "malformed": 0}


def test_a_wrong_request_is_not_retried():
    with FakeEndpoint(lambda body, headers, hit: (400, {"error": {"message": "audio too long"}})) as fake:
        client = ChatEndpoint(fake.url, "m", backoff=0.01, max_retries=3)
        with pytest.raises(EndpointError, match="HTTP 400: .*audio too long") as info:
            client.chat(messages=MESSAGES)
    assert len(fake.seen) == 1 and info.value.attempts == 1 and info.value.status == 400
    assert not info.value.transient and not info.value.unreachable


def test_a_server_that_times_out_gives_a_clear_error_after_the_retries():
    def slow(body, headers, hit):
        time.sleep(1.0)
        return ok(body, headers, hit)

    with FakeEndpoint(slow) as fake:
        client = ChatEndpoint(fake.url, "m", timeout=0.2, backoff=0.01, max_retries=1)
        start = time.monotonic()
        with pytest.raises(EndpointError, match=r"APITimeoutError after 2 attempt\(s\).*no reply within 0.2 s") as info:
            client.chat(messages=MESSAGES)
        assert time.monotonic() - start < 1.5  # bounded by the timeout, not by the server
    assert info.value.cause == "APITimeoutError" and info.value.transient and not info.value.unreachable
    assert len(fake.seen) == 2


def test_an_endpoint_nobody_listens_on_is_unreachable():
    client = ChatEndpoint(f"http://127.0.0.1:{free_port()}/v1", "m", backoff=0.01, max_retries=1)
    with pytest.raises(EndpointError, match=r"APIConnectionError after 2 attempt\(s\)") as info:
        client.chat(messages=MESSAGES)
    assert info.value.unreachable and info.value.status is None and client.stats["failures"] == 1


def test_the_key_is_sent_as_bearer_from_the_argument_or_the_named_variable(monkeypatch):
    monkeypatch.setenv("MY_ENDPOINT_KEY", "from-env")
    monkeypatch.setenv("OPENAI_API_KEY", "never-sent-unless-named")
    with FakeEndpoint(ok) as fake:
        ChatEndpoint(fake.url, "m", api_key="sk-argument", api_key_env="MY_ENDPOINT_KEY").chat(messages=MESSAGES)
        ChatEndpoint(fake.url, "m", api_key_env="MY_ENDPOINT_KEY").chat(messages=MESSAGES)
        ChatEndpoint(fake.url, "m").chat(messages=MESSAGES)
    sent = [r["headers"]["authorization"] for r in fake.seen]
    assert sent == ["Bearer sk-argument", "Bearer from-env", "Bearer EMPTY"]


@pytest.mark.parametrize("reply", ["html", "no_choices", "null_content", "null_message"])
def test_malformed_replies_are_retried_then_fail_clearly(reply):
    def script(body, headers, hit):
        if reply == "html":
            return 200, "<html>502 Bad Gateway</html>"
        if reply == "no_choices":
            return 200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": []}
        payload = completion([None], body)
        if reply == "null_message":
            payload["choices"][0]["message"] = None
        return 200, payload

    with FakeEndpoint(script) as fake:
        client = ChatEndpoint(fake.url, "m", backoff=0.01, max_retries=2)
        with pytest.raises(EndpointError, match=r"MalformedReply after 3 attempt\(s\)") as info:
            client.chat(messages=MESSAGES)
    assert info.value.malformed and len(fake.seen) == 3 and client.stats["malformed"] == 3


def test_empty_replies_are_told_apart_from_answers():
    assert empty_reply({"choices": [{"message": {"content": "  "}}, {"message": {"content": ""}}]})
    assert empty_reply({"choices": []}) and empty_reply({})
    assert not empty_reply({"choices": [{"message": {"content": ""}}, {"message": {"content": "sad"}}]})
    with FakeEndpoint(lambda body, headers, hit: (200, completion([""], body))) as fake:
        reply = ChatEndpoint(fake.url, "m").chat(messages=MESSAGES)  # a 200 with "" is an answer, not malformed
    assert empty_reply(reply)
    assert issubclass(MalformedReply, Exception)


def test_a_server_that_only_knows_max_tokens_is_asked_again_with_it():
    def script(body, headers, hit):
        if "max_completion_tokens" in body:
            return 400, {"error": {"message": "Unrecognized request argument: max_completion_tokens"}}
        return ok(body, headers, hit)

    with FakeEndpoint(script) as fake:
        client = ChatEndpoint(fake.url, "m", max_retries=0)
        client.chat(messages=MESSAGES, max_completion_tokens=7)
        client.chat(messages=MESSAGES, max_completion_tokens=8)
    assert [r["body"].get("max_tokens") for r in fake.seen] == [None, 7, 8] and client.token_field == "max_tokens"


def test_backoff_grows_is_capped_and_honours_retry_after():
    assert all(0.5 <= backoff_delay(1, 1.0, 30.0) <= 1.0 for _ in range(20))
    assert all(2.0 <= backoff_delay(3, 1.0, 30.0) <= 4.0 for _ in range(20))
    assert backoff_delay(10, 1.0, 5.0) <= 5.0 and backoff_delay(1, 1.0, 5.0, retry_after=3.0) == 3.0
    assert [transient_status(s) for s in (None, 500, 503, 408, 409, 429, 400, 401, 404, 422)] == [True] * 6 + [False] * 4

    def script(body, headers, hit):
        return (429, {"error": {"message": "later"}}, {"Retry-After": "0"}) if hit == 1 else ok(body, headers, hit)

    with FakeEndpoint(script) as fake:
        ChatEndpoint(fake.url, "m", backoff=60.0).chat(messages=MESSAGES)  # waits 0 s as asked, not 30-60 s
    assert len(fake.seen) == 2


# -- the three users --------------------------------------------------------------------------------------------
def test_the_evaluator_client_raises_the_one_error_and_caches_only_answers(tmp_path):
    from emoreason.eval.client import EndpointClient, RequestFailed, ResponseCache

    assert RequestFailed is EndpointError

    def script(body, headers, hit):
        text = body["messages"][0]["content"]
        if text == "bad":
            return 400, {"error": {"message": "no"}}
        return 200, completion(["" if text == "empty" else "sad"], body)

    with FakeEndpoint(script) as fake:
        async def run():
            client = EndpointClient(fake.url, "m", api_key="k", backoff=0.01,
                                    cache=ResponseCache(tmp_path / "c.sqlite"))
            try:
                for text in ("hello", "hello", "empty"):
                    await client.chat(messages=[{"role": "user", "content": text}])
                with pytest.raises(RequestFailed, match="HTTP 400"):
                    await client.chat(messages=[{"role": "user", "content": "bad"}])
                return client.stats, len(client.cache)
            finally:
                await client.close()

        stats, cached = asyncio.run(run())
    assert cached == 1 and stats["cache_hits"] == 1 and stats["empty_not_cached"] == 1 and stats["failures"] == 1
    assert stats["requests"] == 3 and fake.seen[0]["headers"]["authorization"] == "Bearer k"


def test_the_training_judge_reads_its_key_from_the_environment_and_scores_or_gives_none(monkeypatch):
    from emoreason.train.judge import JudgeUnavailable, OpenAIJudge

    monkeypatch.setenv("JUDGE_KEY", "sk-judge")

    def script(body, headers, hit):
        text = body["messages"][-1]["content"]
        if text == "ping":  # one token: a reasoning model may leave the content null; the judge is up all the same
            return 200, completion([None], body)
        if "TOO LONG" in text:
            return 400, {"error": {"message": "context length exceeded"}}
        if "BROKEN" in text:
            return 500, {"error": {"message": "crashed"}}
        return 200, completion(['{"score": 5, "reason": "grounded"}'], body)

    with FakeEndpoint(script) as fake:
        judge = OpenAIJudge(fake.url, "judge", api_key_env="JUDGE_KEY", max_retries=1)
        judge.probe()
        context = {"cues": {"pitch_level": "high"}, "answer": "happy"}
        assert judge.score(["The pitch is high.", "TOO LONG"], [context] * 2) == [1.0, None]
        with pytest.raises(JudgeUnavailable, match=r"failed: InternalServerError after 2 attempt\(s\)"):
            judge.score(["BROKEN"], [context])
    assert {r["headers"]["authorization"] for r in fake.seen} == {"Bearer sk-judge"}
    assert all(r["body"]["max_completion_tokens"] in (1, 256) for r in fake.seen)


def test_the_teacher_tells_a_failed_request_from_an_unreachable_endpoint():
    from emoreason.datagen.teachers import OpenAITeacher, TeacherConfig, TeacherFailure, TeacherUnavailable

    def script(body, headers, hit):
        text = body["messages"][-1]["content"]
        if "SLOW" in text:
            time.sleep(1.0)
        if "REFUSED" in text:
            return 400, {"error": {"message": "refused"}}
        return 200, completion(["one"], body)  # one choice whatever n asked: the teacher asks for the rest

    with FakeEndpoint(script) as fake:
        teacher = OpenAITeacher(TeacherConfig(name="openai", model="t", base_url=fake.url, timeout=0.3,
                                              max_retries=0))
        requests = [_request("fine", n=2), _request("REFUSED"), _request("SLOW")]
        fine, refused, slow = teacher.generate(requests)
    seeds = [r["body"]["seed"] for r in fake.seen if r["body"]["messages"][-1]["content"] == "fine"]
    assert fine == ["one", "one"] and seeds == [7, 8]
    assert isinstance(refused, TeacherFailure) and "HTTP 400" in refused.reason
    assert isinstance(slow, TeacherFailure) and "APITimeoutError" in slow.reason  # a timeout is not "unreachable"
    dead = OpenAITeacher(TeacherConfig(name="openai", model="t", base_url=f"http://127.0.0.1:{free_port()}/v1",
                                       max_retries=0))
    with pytest.raises(TeacherUnavailable, match="cannot be reached"):
        dead.generate([_request("a"), _request("b")])


def _request(prompt: str, n: int = 1):
    from emoreason.datagen.seed import SeedDescription
    from emoreason.datagen.teachers import TeacherRequest

    description = SeedDescription(duration=1.0, transcript=None, gender=None, cues={})
    return TeacherRequest(key=prompt, prompt=prompt, n=n, seed=7, description=description, target="sad")
