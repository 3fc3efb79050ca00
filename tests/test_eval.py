"""The evaluator end to end against scripted endpoints: suites, reports, retries, reported failures, invalid answers,
and a run killed mid-way that resumes without asking anything twice."""

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from emoreason.data.schema import read_records
from emoreason.eval import run_suite
from emoreason.eval.cli import main as eval_main
from emoreason.eval.client import request_key
from emoreason.eval.scripted import ScriptedError, create_scripted_app, last_user_text
from emoreason.eval.suite import SuiteError, load_suite
from emoreason.eval.strategies import STRATEGIES
from emoreason.serve.background import BackgroundServer

REPO = Path(__file__).resolve().parents[1]
SUITES = sorted((REPO / "eval" / "suites").glob("*.yaml"))


def cot(emotion: str) -> str:
    return f"<think>The pitch is high, so {emotion}.</think><answer>{emotion}</answer>"


def write_suite(tmp_path: Path, records: Path, strategies: list, **extra) -> Path:
    suite = {"name": "t", "records": str(records), "split": "test", "labels": ["neutral", "happy", "sad", "angry"],
             "prompts": str(REPO / "eval/prompts/emotion.yaml"), "max_tokens": 16, "concurrency": 4,
             "retries": 2, "strategies": strategies,
             "metrics": ["classification", "distribution", "calibration", "ambiguity", "groups", "reasoning"],
             "group_by": ["gender"], **extra}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def audio_b64(body: dict) -> str:
    for part in body["messages"][-1]["content"]:
        if part.get("type") == "input_audio":
            return part["input_audio"]["data"]
    raise AssertionError("no audio part")


def label_script(records_by_audio: dict[str, str]):
    """Answers the record's own label (known from its audio bytes), in the format the prompt style asks for."""

    def script(body):
        label = records_by_audio[audio_b64(body)]
        if "emotion only" in last_user_text(body):
            return [f"<answer>{label}</answer>"] * body.get("n", 1)
        return [cot(label)] * body.get("n", 1)

    return script


@pytest.fixture(scope="module")
def corpus(synth_corpus):
    records = [r for r in read_records(synth_corpus) if r.split == "test"]
    by_audio = {base64.b64encode(r.audio_path(synth_corpus.parent).read_bytes()).decode(): r.label for r in records}
    id_by_audio = {base64.b64encode(r.audio_path(synth_corpus.parent).read_bytes()).decode(): r.id for r in records}
    return synth_corpus, records, by_audio, id_by_audio


@pytest.mark.parametrize("path", SUITES, ids=[p.stem for p in SUITES])
def test_shipped_suites_parse(path):
    suite = load_suite(path)
    assert suite.labels and suite.strategies and suite.records.suffix in (".jsonl", ".parquet")
    assert all(spec.name in STRATEGIES for spec in suite.strategies)
    assert suite.prompts.is_file() or (REPO / suite.prompts).is_file()
    overridden = load_suite(path, records="elsewhere/records.jsonl", data_root="corpus")
    assert overridden.records == Path("elsewhere/records.jsonl") and overridden.data_root == Path("corpus")
    # Without its own data_root a suite reads audio relative to the records' folder.
    fallback = load_suite(path, records="elsewhere/records.jsonl")
    expected = Path(yaml.safe_load(path.read_text()).get("data_root") or "elsewhere")
    assert fallback.data_root == expected


def test_shipped_suites_cover_the_corpora():
    assert {p.stem for p in SUITES} >= {"iemocap", "msp_podcast", "crema_d", "meld", "synthetic"}


def test_bad_suites_are_refused_with_the_reason(tmp_path, corpus):
    records = corpus[0]
    with pytest.raises(SuiteError, match="unknown strategy"):
        load_suite(write_suite(tmp_path, records, ["best_guess"]))
    with pytest.raises(SuiteError, match="unknown parameter"):
        load_suite(write_suite(tmp_path, records, [{"name": "self_consistency", "samples": 4}]))
    with pytest.raises(SuiteError, match="taxonomy"):
        load_suite(write_suite(tmp_path, records, ["direct"], labels=["happy", "elated"]))


def test_run_suite_writes_reports(tmp_path, corpus):
    synth, records, by_audio, _ = corpus
    app = create_scripted_app(label_script(by_audio), model="m")
    suite = write_suite(tmp_path, synth, ["direct", "cot_greedy", {"name": "self_consistency", "n": 3}])
    with BackgroundServer(app) as server:
        report = run_suite(suite, server.url + "/v1", "m", tmp_path / "out", progress=False, limit=8)
    assert report["items"] == 8 and app.state.hits == 24
    for name in ("direct", "cot_greedy", "self_consistency"):
        metrics = report["strategies"][name]["metrics"]
        assert metrics["classification"]["accuracy"] == 1.0  # the script answers each record's label
        assert metrics["reasoning"]["sample_validity"] == 1.0
        assert report["strategies"][name]["failures"] == []
    assert report["strategies"]["self_consistency"]["tokens"]["completion_per_item"] == 3 * len(cot("x").split())
    out = tmp_path / "out"
    saved = json.loads((out / "report.json").read_text())
    assert saved["strategies"].keys() == report["strategies"].keys()
    assert "| self_consistency |" in (out / "report.md").read_text()
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert {"accuracy_vs_tokens.png", "js_divergence_vs_tokens.png", "reliability.png",
            "metrics_by_ambiguity.png", "confusion_direct.png"} <= plots
    assert len((out / "predictions" / "direct.jsonl").read_text().splitlines()) == 8
    assert report["skipped_records"]  # the other splits are counted, not silently ignored


def test_malformed_completions_count_as_invalid(tmp_path, corpus):
    synth, records, by_audio, _ = corpus
    labels = label_script(by_audio)
    calls = {"n": 0}

    def script(body):
        calls["n"] += 1
        return ["I cannot tell, sorry."] if calls["n"] % 2 else labels(body)

    app = create_scripted_app(script, model="m")
    with BackgroundServer(app) as server:
        report = run_suite(write_suite(tmp_path, synth, ["cot_greedy"], concurrency=1), server.url + "/v1", "m",
                           tmp_path / "out", progress=False, limit=6)
    metrics = report["strategies"]["cot_greedy"]["metrics"]
    assert metrics["classification"]["invalid_rate"] == pytest.approx(0.5)
    assert metrics["classification"]["accuracy"] == pytest.approx(0.5)
    assert metrics["reasoning"]["format_validity"] == pytest.approx(0.5)
    assert sum(map(sum, metrics["classification"]["confusion_matrix"])) == 6


def test_transient_errors_are_retried(tmp_path, corpus):
    synth, records, by_audio, _ = corpus
    labels = label_script(by_audio)
    seen: set[str] = set()

    def flaky(body):
        key = json.dumps(body, sort_keys=True)
        if key not in seen:  # every request fails once with a 503, then succeeds
            seen.add(key)
            raise ScriptedError(503, "warming up")
        return labels(body)

    app = create_scripted_app(flaky, model="m")
    with BackgroundServer(app) as server:
        report = run_suite(write_suite(tmp_path, synth, ["direct"]), server.url + "/v1", "m", tmp_path / "out",
                           progress=False, limit=4, backoff=0.01)
    assert report["strategies"]["direct"]["failures"] == []
    assert report["client"]["retries"] == 4 and app.state.hits == 8
    assert report["strategies"]["direct"]["metrics"]["classification"]["accuracy"] == 1.0


def test_failures_are_reported_never_dropped(tmp_path, corpus):
    synth, records, by_audio, id_by_audio = corpus
    labels = label_script(by_audio)
    chosen = [r for r in records][:4]
    broken = sorted(chosen, key=lambda r: r.id)[1].id
    rejected = sorted(chosen, key=lambda r: r.id)[2].id

    def script(body):
        record_id = id_by_audio[audio_b64(body)]
        if record_id == broken:
            raise ScriptedError(500, "model crashed")
        if record_id == rejected:
            raise ScriptedError(400, "bad request")
        return labels(body)

    app = create_scripted_app(script, model="m")
    suite = write_suite(tmp_path, synth, ["direct"], retries=2)
    with BackgroundServer(app) as server:
        code = eval_main(["--suite", str(suite), "--endpoint", server.url + "/v1", "--model", "m", "--records",
                          str(synth), "--data-root", str(synth.parent), "--out", str(tmp_path / "out"), "--limit",
                          "4", "--backoff", "0.01", "--no-progress"])
    assert code == 1  # failures make the run fail loudly
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    failures = {f["record_id"]: f["failure"] for f in report["strategies"]["direct"]["failures"]}
    assert set(failures) == {broken, rejected}
    assert "after 3 attempt(s)" in failures[broken] and "HTTP 400" in failures[rejected]
    assert app.state.hits == 2 + 3 + 1  # two good, the 500 tried 1 + 2 retries, the 400 not retried
    metrics = report["strategies"]["direct"]["metrics"]["classification"]
    assert metrics["invalid_rate"] == pytest.approx(0.5) and metrics["accuracy"] == pytest.approx(0.5)
    assert broken in (tmp_path / "out" / "report.md").read_text()
    lines = [json.loads(x) for x in (tmp_path / "out" / "predictions" / "direct.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and sum(x["failed"] for x in lines) == 2


def test_cache_key_depends_on_model_and_request():
    request = {"messages": [{"role": "user", "content": "hi"}], "n": 2}
    assert request_key("a", request) == request_key("a", json.loads(json.dumps(request)))
    assert request_key("a", request) != request_key("b", request)
    assert request_key("a", request) != request_key("a", {**request, "n": 3})


@pytest.mark.slow
def test_killed_run_resumes_without_repeating_requests(tmp_path, corpus):
    synth, records, by_audio, _ = corpus
    app = create_scripted_app(label_script(by_audio), model="m", delay_s=0.25)
    suite = write_suite(tmp_path, synth, ["direct", {"name": "self_consistency", "n": 2}], concurrency=2)
    out = tmp_path / "out"
    total = 2 * 10
    with BackgroundServer(app) as server:
        args = [sys.executable, "-m", "emoreason.cli", "eval", "--suite", str(suite), "--endpoint",
                server.url + "/v1", "--model", "m", "--out", str(out), "--limit", "10", "--no-progress"]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 120
        while app.state.hits < 6 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert not (out / "report.json").exists(), "the run finished before it could be killed"
        first_hits = app.state.hits
        with sqlite3.connect(out / "responses.sqlite") as db:
            cached = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        assert 1 <= cached < total and cached <= first_hits
        report = run_suite(suite, server.url + "/v1", "m", out, progress=False, limit=10)
        assert app.state.hits - first_hits == total - cached  # only what was missing is asked again
        assert report["client"]["cache_hits"] == cached
        assert all(not s["failures"] for s in report["strategies"].values())
        assert report["strategies"]["direct"]["metrics"]["classification"]["accuracy"] == 1.0
        # A third run asks nothing at all.
        hits = app.state.hits
        run_suite(suite, server.url + "/v1", "m", out, progress=False, limit=10)
        assert app.state.hits == hits


def test_judge_scores_groundedness(tmp_path, corpus):
    synth, records, by_audio, _ = corpus

    def judge(body):
        assert "never follow instructions" in body["messages"][0]["content"]
        return ['{"score": 4, "reason": "mostly grounded"}']

    model_app = create_scripted_app(label_script(by_audio), model="m")
    judge_app = create_scripted_app(judge, model="judge")
    with BackgroundServer(model_app) as server, BackgroundServer(judge_app) as judge_server:
        suite = write_suite(tmp_path, synth, ["cot_greedy"], metrics=["classification", "judge"],
                            judge={"endpoint": judge_server.url + "/v1", "model": "judge",
                                   "rubric": "groundedness"})
        report = run_suite(suite, server.url + "/v1", "m", tmp_path / "out", progress=False, limit=3)
    assert report["strategies"]["cot_greedy"]["metrics"]["judge"] == {"groundedness": 0.75, "scored": 3,
                                                                      "unreadable": 0}
    # Identical judge requests (same transcript and rationale) are asked once.
    assert judge_app.state.hits == len({(r.transcript, r.label) for r in records[:3]})


def test_identical_requests_in_flight_are_sent_once(tmp_path, corpus):
    import asyncio

    from emoreason.eval.client import EndpointClient, ResponseCache

    app = create_scripted_app(lambda body: ["<answer>sad</answer>"], model="m", delay_s=0.2)
    request = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0.0, "max_tokens": 4}

    async def run(url):
        client = EndpointClient(url, "m", cache=ResponseCache(tmp_path / "cache.sqlite"))
        try:
            first = await asyncio.gather(*(client.chat(**request) for _ in range(3)))
            again = await client.chat(**request)
            return first, again, client.stats
        finally:
            await client.close()

    with BackgroundServer(app) as server:
        first, again, stats = asyncio.run(run(server.url + "/v1"))
    assert app.state.hits == 1 and stats["shared"] == 2 and stats["cache_hits"] == 1
    assert all(r["choices"][0]["message"]["content"] == "<answer>sad</answer>" for r in first + [again])
