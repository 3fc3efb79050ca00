"""Evaluation over several endpoints (eval/endpoints.py): requests spread by least outstanding work, a failing
endpoint taken out and its requests sent to the others, and the cache keyed as with one endpoint. Scripted endpoints
on 127.0.0.1."""

from __future__ import annotations

import base64
import socket
import sqlite3
from pathlib import Path

import pytest
import yaml

from emoreason.data.schema import read_records
from emoreason.eval import run_suite
from emoreason.eval.cli import build_parser
from emoreason.eval.endpoints import EndpointPool, make_client
from emoreason.eval.client import EndpointClient
from emoreason.eval.scripted import ScriptedError, create_scripted_app
from emoreason.serve.background import BackgroundServer

REPO = Path(__file__).resolve().parents[1]
LABELS = ["neutral", "happy", "sad", "angry"]


@pytest.fixture(scope="module")
def corpus(synth_corpus):
    records = [r for r in read_records(synth_corpus) if r.split == "test"]
    by_audio = {base64.b64encode(r.audio_path(synth_corpus.parent).read_bytes()).decode(): r.label for r in records}
    return synth_corpus, by_audio


def suite_file(tmp_path, records, **extra):
    suite = {"name": "t", "records": str(records), "split": "test", "labels": LABELS,
             "prompts": str(REPO / "eval/prompts/emotion.yaml"), "max_tokens": 16, "concurrency": 2, "retries": 2,
             "strategies": ["cot_greedy"], "metrics": ["classification"], **extra}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def answering(by_audio, fail: int | None = None):
    def script(body):
        if fail is not None:
            raise ScriptedError(fail, "scripted failure")
        for message in body["messages"]:
            for part in message["content"] if isinstance(message["content"], list) else []:
                if part.get("type") == "input_audio":
                    label = by_audio[part["input_audio"]["data"]]
                    return [f"<think>The pitch says {label}.</think><answer>{label}</answer>"] * body.get("n", 1)
        raise AssertionError("no audio")

    return script


def dead_url() -> str:
    """A loopback port nothing listens on (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_least_outstanding_work_and_out_of_service():
    pool = EndpointPool(["http://a/v1", "http://b/v1", "http://c/v1"], "m")
    pool.outstanding = [2, 0, 1]
    assert pool.pick() == 1
    pool.outstanding = [1, 1, 1]
    assert sorted(pool.pick() for _ in range(3)) == [0, 1, 2]  # ties go round
    pool.outstanding = [3, 0, 1]
    pool.take_out(1)
    assert pool.pick() == 2 and pool.stats["endpoints"]["http://b/v1"]["taken_out"] == 1
    pool.take_out(0), pool.take_out(2)
    assert pool.pick() is None
    assert isinstance(make_client("http://a/v1", "m"), EndpointClient)  # one endpoint: the client of today
    assert isinstance(make_client(["http://a/v1"], "m"), EndpointClient)
    with pytest.raises(ValueError, match="distinct"):
        EndpointPool(["http://a/v1", "http://a/v1"], "m")


def test_the_flag_repeats_and_has_the_issue_s_name():
    args = build_parser().parse_args(["--suite", "s", "--model", "m", "--endpoint", "http://a/v1",
                                      "--base-url", "http://b/v1"])
    assert args.endpoint == ["http://a/v1", "http://b/v1"]


def test_requests_spread_over_replicas_and_the_answers_are_the_same(tmp_path, corpus):
    records, by_audio = corpus
    apps = [create_scripted_app(answering(by_audio), model="m", delay_s=0.05) for _ in range(2)]
    with BackgroundServer(apps[0]) as a, BackgroundServer(apps[1]) as b:
        report = run_suite(suite_file(tmp_path, records), [a.url + "/v1", b.url + "/v1"], "m", tmp_path / "out",
                           progress=False, limit=16)
    hits = [app.state.hits for app in apps]
    assert sum(hits) == 16 and min(hits) >= 4, hits  # both replicas worked
    assert report["strategies"]["cot_greedy"]["metrics"]["classification"]["accuracy"] == 1.0
    assert report["client"]["failures"] == 0 and report["endpoint"] == [a.url + "/v1", b.url + "/v1"]


def test_a_failing_endpoint_is_taken_out_and_its_requests_go_to_the_others(tmp_path, corpus):
    records, by_audio = corpus
    good = create_scripted_app(answering(by_audio), model="m")
    broken = create_scripted_app(answering(by_audio, fail=503), model="m")
    with BackgroundServer(good) as g, BackgroundServer(broken) as b:
        urls = [dead_url(), b.url + "/v1", g.url + "/v1"]
        report = run_suite(suite_file(tmp_path, records), urls, "m", tmp_path / "out", progress=False, limit=12,
                           backoff=0.01)
    strategy = report["strategies"]["cot_greedy"]
    assert strategy["failures"] == [] and strategy["metrics"]["classification"]["accuracy"] == 1.0
    stats = report["client"]["endpoints"]
    assert stats[urls[0]]["taken_out"] >= 1 and stats[urls[1]]["taken_out"] >= 1
    assert stats[urls[2]]["answered"] == 12 and good.state.hits == 12
    assert broken.state.hits <= 2  # taken out after its first failures (30 s), not asked for every item
    assert report["client"]["failovers"] >= 2


def test_a_request_the_endpoint_refuses_fails_without_taking_it_out(tmp_path, corpus):
    records, by_audio = corpus
    refusing = create_scripted_app(answering(by_audio, fail=400), model="m")
    good = create_scripted_app(answering(by_audio), model="m")
    with BackgroundServer(refusing) as r, BackgroundServer(good) as g:
        report = run_suite(suite_file(tmp_path, records, concurrency=1), [r.url + "/v1", g.url + "/v1"], "m",
                           tmp_path / "out", progress=False, limit=4)
    stats = report["client"]["endpoints"][r.url + "/v1"]
    assert refusing.state.hits >= 1 and stats["taken_out"] == 0
    assert len(report["strategies"]["cot_greedy"]["failures"]) == refusing.state.hits


def test_the_cache_is_keyed_by_the_endpoint_that_answered(tmp_path, corpus):
    records, by_audio = corpus
    apps = [create_scripted_app(answering(by_audio), model="m", delay_s=0.02) for _ in range(2)]
    suite, out = suite_file(tmp_path, records), tmp_path / "out"
    with BackgroundServer(apps[0]) as a, BackgroundServer(apps[1]) as b:
        urls = [a.url + "/v1", b.url + "/v1"]
        run_suite(suite, urls, "m", out, progress=False, limit=12)
        first = [app.state.hits for app in apps]
        assert sum(first) == 12 and min(first) > 0
        with sqlite3.connect(out / "responses.sqlite") as db:
            assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 12
        run_suite(suite, list(reversed(urls)), "m", out, progress=False, limit=12)  # resumed: nothing asked again
        assert [app.state.hits for app in apps] == first
        # One endpoint, as today: its own answers come from the cache, the other endpoint's are asked again.
        run_suite(suite, urls[0], "m", out, progress=False, limit=12)
        assert apps[0].state.hits == first[0] + first[1] and apps[1].state.hits == first[1]
