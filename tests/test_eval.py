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
    for message in body["messages"]:  # the clip's turn (later turns, e.g. self-refine's, are text)
        for part in message["content"] if isinstance(message["content"], list) else []:
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
            "metrics_by_ambiguity.png", "confusion_direct.png", "tokens_by_strategy.png"} <= plots
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
    # each clip keeps its grade: in the predictions and on the report page's rows
    predictions = (tmp_path / "out" / "predictions" / "cot_greedy.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in predictions]
    assert [r["judge_score"] for r in rows] == [0.75] * 3
    clips = json.loads((tmp_path / "out" / "report.json").read_text())["clips"]
    assert [c["strategies"]["cot_greedy"]["judge"] for c in clips] == [0.75] * 3


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


# -- issue 14: client robustness, requests, validity, tokens, the audio verifier ---------------------------------
def test_non_json_replies_are_retried_then_recorded_as_failed_items(tmp_path, corpus):
    from fastapi.responses import HTMLResponse, Response

    synth, records, by_audio, id_by_audio = corpus
    labels = label_script(by_audio)
    chosen = sorted(records[:4], key=lambda r: r.id)
    gateway, truncated = chosen[1].id, chosen[2].id
    seen: set[str] = set()

    def script(body):
        record_id = id_by_audio[audio_b64(body)]
        if record_id == gateway:  # a proxy's error page, with status 200
            return HTMLResponse("<html><body>502 Bad Gateway</body></html>")
        if record_id == truncated and record_id not in seen:  # cut off once, then whole
            seen.add(record_id)
            return Response('{"id": "x", "object": "chat.completion", "choices": [{"ind', media_type="application/json")
        return labels(body)

    app = create_scripted_app(script, model="m")
    with BackgroundServer(app) as server:
        code = eval_main(["--suite", str(write_suite(tmp_path, synth, ["direct"])), "--endpoint",
                          server.url + "/v1", "--model", "m", "--out", str(tmp_path / "out"), "--limit", "4",
                          "--backoff", "0.01", "--no-progress"])
    assert code == 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    failures = {f["record_id"]: f["failure"] for f in report["strategies"]["direct"]["failures"]}
    assert set(failures) == {gateway} and "MalformedReply after 3 attempt(s)" in failures[gateway]
    assert report["client"]["malformed"] == 3 + 1  # the page three times, the truncated body once
    assert report["strategies"]["direct"]["metrics"]["classification"]["accuracy"] == pytest.approx(0.75)


def test_empty_answers_are_not_cached(tmp_path, corpus):
    synth, records, by_audio, _ = corpus
    labels = label_script(by_audio)
    state = {"empty": True}
    app = create_scripted_app(lambda body: [""] if state["empty"] else labels(body), model="m")
    suite = write_suite(tmp_path, synth, ["direct"])
    with BackgroundServer(app) as server:
        first = run_suite(suite, server.url + "/v1", "m", tmp_path / "out", progress=False, limit=3)
        state["empty"] = False
        second = run_suite(suite, server.url + "/v1", "m", tmp_path / "out", progress=False, limit=3)
    assert first["strategies"]["direct"]["metrics"]["classification"]["accuracy"] == 0.0
    assert first["cache_entries"] == 0 and first["client"]["empty_not_cached"] == 3
    assert second["client"]["cache_hits"] == 0 and app.state.hits == 6
    assert second["strategies"]["direct"]["metrics"]["classification"]["accuracy"] == 1.0


def test_the_cache_never_answers_for_another_endpoint_or_model(tmp_path, corpus):
    synth, records, by_audio, _ = corpus
    always_sad = create_scripted_app(lambda body: ["<answer>sad</answer>"], model="m")
    right = create_scripted_app(label_script(by_audio), model="m")
    suite = write_suite(tmp_path, synth, ["direct"])
    with BackgroundServer(always_sad) as a, BackgroundServer(right) as b:
        run_suite(suite, a.url + "/v1", "m", tmp_path / "out", progress=False, limit=4)
        report = run_suite(suite, b.url + "/v1", "m", tmp_path / "out", progress=False, limit=4)
    assert right.state.hits == 4 and report["client"]["cache_hits"] == 0 and report["endpoint"] == b.url + "/v1"
    assert report["strategies"]["direct"]["metrics"]["classification"]["accuracy"] == 1.0
    request = {"messages": [{"role": "user", "content": "hi"}]}
    assert request_key("m", request, "http://a/v1") != request_key("m", request, "http://b/v1")


def test_servers_that_only_know_max_tokens_still_work(tmp_path, corpus):
    synth, records, by_audio, _ = corpus
    labels = label_script(by_audio)

    def old_server(body):
        if "max_completion_tokens" in body:
            raise ScriptedError(400, "Unrecognized request argument supplied: max_completion_tokens")
        assert body["max_tokens"] == 16
        return labels(body)

    app = create_scripted_app(old_server, model="m")
    with BackgroundServer(app) as server:
        report = run_suite(write_suite(tmp_path, synth, ["direct", "cot_greedy"], concurrency=1),
                           server.url + "/v1", "m", tmp_path / "out", progress=False, limit=3)
    assert all(not s["failures"] for s in report["strategies"].values())
    assert report["strategies"]["cot_greedy"]["metrics"]["classification"]["accuracy"] == 1.0
    assert app.state.hits == 1 + 6  # one refusal, then every request under the old name


def test_format_validity_means_the_format_each_strategy_asked_for(tmp_path, corpus):
    synth, records, by_audio, _ = corpus
    app = create_scripted_app(label_script(by_audio), model="m")  # direct: <answer> only; cot: think + answer
    with BackgroundServer(app) as server:
        report = run_suite(write_suite(tmp_path, synth, ["direct", "cot_greedy"]), server.url + "/v1", "m",
                           tmp_path / "out", progress=False, limit=4)
    for name in ("direct", "cot_greedy"):
        assert report["strategies"][name]["metrics"]["reasoning"]["format_validity"] == 1.0, name
    assert report["strategies"]["direct"]["metrics"]["reasoning"]["consistency"] is None  # no rationale asked


def test_report_json_never_holds_a_bare_nan(tmp_path):
    from emoreason.eval.report import write_report

    tokens = {"answered": 1.0, "prompt_per_item": 10.0, "completion_per_item": 5.0, "total_per_item": 15.0,
              "requests_per_item": 1.0}
    report = {"suite": "t", "model": "m", "endpoint": "e", "items": 1, "records_path": "r",
              "strategies": {"s": {"metrics": {"distribution": {"js_divergence": float("nan"), "kl_divergence": 0.1,
                                                                "bhattacharyya": 1.0, "r2": float("inf")}},
                                   "tokens": tokens, "failures": []}}}
    write_report(report, tmp_path)
    text = (tmp_path / "report.json").read_text()
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in report.json"))
    assert saved["strategies"]["s"]["metrics"]["distribution"]["js_divergence"] is None
    assert saved["non_finite"] == ["/strategies/s/metrics/distribution/js_divergence",
                                   "/strategies/s/metrics/distribution/r2"]


def test_tokens_count_prompts_refine_turns_and_a_separate_audio_verifier(tmp_path, corpus):
    synth, records, by_audio, _ = corpus
    labels = label_script(by_audio)

    def verifier(body):
        content = body["messages"][-1]["content"]
        assert content[0]["type"] == "input_audio"  # the verifier hears the clip
        return ['{"score": 4, "reason": "fits"}']

    model_app = create_scripted_app(labels, model="m")
    verifier_app = create_scripted_app(verifier, model="qwen2-audio")
    with BackgroundServer(model_app) as server, BackgroundServer(verifier_app) as vserver:
        suite = write_suite(tmp_path, synth, ["cot_greedy", {"name": "self_refine", "rounds": 1},
                                              {"name": "alm_verifier", "n": 2}],
                            metrics=["classification", "reasoning"],
                            verifier={"endpoint": vserver.url + "/v1", "model": "qwen2-audio"})
        report = run_suite(suite, server.url + "/v1", "m", tmp_path / "out", progress=False, limit=2)
        verified = verifier_app.state.hits
        again = run_suite(suite, server.url + "/v1", "m", tmp_path / "out", progress=False, limit=2)
    assert verified == 2 * 2  # two records, two candidates each
    assert verifier_app.state.hits == verified  # verdicts are cached by what was verified (the fence id is random)
    assert again["strategies"]["alm_verifier"]["tokens"] == report["strategies"]["alm_verifier"]["tokens"]
    tok = {name: s["tokens"] for name, s in report["strategies"].items()}
    cot_len = len(cot("x").split())
    assert tok["cot_greedy"]["prompt_per_item"] == 10 and tok["cot_greedy"]["total_per_item"] == 10 + cot_len
    assert tok["self_refine"]["prompt_per_item"] == 2 * 10  # the re-sent conversation is paid again
    assert tok["alm_verifier"]["verifier_per_item"] == 2 * (10 + 4)  # two candidates, each verified
    assert tok["alm_verifier"]["verifier_prompt_per_item"] == 2 * 10
    assert tok["alm_verifier"]["verifier_completion_per_item"] == 2 * 4
    assert tok["alm_verifier"]["total_per_item"] == 10 + 2 * cot_len + 2 * (10 + 4)
    assert report["verifier"] == {"endpoint": vserver.url + "/v1", "model": "qwen2-audio",
                                  "rubric": "audio_verifier"}
    assert report["strategies"]["alm_verifier"]["metrics"]["classification"]["accuracy"] == 1.0
    assert "total tok/item" in (tmp_path / "out" / "report.md").read_text()


# -- issue 25: null replies are failures; unreadable verdicts are asked again ------------------------------------------
@pytest.mark.parametrize("choice", [{"index": 0, "message": None, "finish_reason": "stop"},
                                    {"index": 0, "message": {"role": "assistant", "content": None},
                                     "finish_reason": "stop"}], ids=["message-null", "content-null"])
def test_a_null_reply_is_retried_then_recorded_as_failed_never_a_wrong_answer(tmp_path, corpus, choice):
    from fastapi.responses import JSONResponse

    synth, records, by_audio, id_by_audio = corpus
    labels = label_script(by_audio)
    chosen = sorted(records[:4], key=lambda r: r.id)
    always_null, null_once = chosen[1].id, chosen[2].id
    seen: set[str] = set()

    def script(body):
        record_id = id_by_audio[audio_b64(body)]
        if record_id == always_null or (record_id == null_once and record_id not in seen):
            seen.add(record_id)
            return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                 "choices": [choice]})
        return labels(body)

    app = create_scripted_app(script, model="m")
    with BackgroundServer(app) as server:
        report = run_suite(write_suite(tmp_path, synth, ["direct"]), server.url + "/v1", "m", tmp_path / "out",
                           progress=False, limit=4, backoff=0.01)
    direct = report["strategies"]["direct"]
    assert {f["record_id"] for f in direct["failures"]} == {always_null}
    assert "no message content" in direct["failures"][0]["failure"]
    assert report["client"]["malformed"] == 3 + 1 and report["client"]["retries"] >= 3
    assert direct["metrics"]["classification"]["accuracy"] == pytest.approx(0.75)  # the failed one counts wrong,
    assert report["cache_entries"] == 3  # as a reported failure; nothing null is cached


class _VerdictClient:
    """An endpoint whose judge replies come from ``replies`` in turn, with the response cache the runner gives."""

    model, base_url = "judge", "http://judge/v1"

    def __init__(self, cache, replies):
        self.cache, self.replies, self.calls = cache, replies, 0
        self.stats = {"cache_hits": 0}

    async def chat(self, **request):
        self.calls += 1
        return {"choices": [{"message": {"content": self.replies[min(self.calls, len(self.replies)) - 1]}}],
                "usage": {}}


@pytest.mark.parametrize("kind", ["judge", "verifier"])
def test_an_unreadable_verdict_is_not_cached_and_a_rerun_asks_again(tmp_path, kind):
    import asyncio

    from emoreason.data.schema import EmotionRecord
    from emoreason.eval.client import ResponseCache
    from emoreason.eval.judge import RubricJudge
    from emoreason.eval.verifier import AudioVerifier

    record = EmotionRecord(id="r", audio="r.wav", duration=1.0, corpus="c", transcript="hello")
    audio = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}

    def score(client):
        if kind == "judge":
            return asyncio.run(RubricJudge(client, "groundedness").score(record, "The pitch is high.", "happy"))
        return asyncio.run(AudioVerifier(client).score(record, audio, "The pitch is high.", "happy"))

    first = _VerdictClient(ResponseCache(tmp_path / "cache.sqlite"), ["I cannot grade this."])
    assert score(first).normalized is None and first.calls == 1
    rerun = _VerdictClient(ResponseCache(tmp_path / "cache.sqlite"), ['{"score": 4, "reason": "grounded"}'])
    assert score(rerun).normalized == pytest.approx(0.75) and rerun.calls == 1  # asked again, not 0 forever
    resumed = _VerdictClient(ResponseCache(tmp_path / "cache.sqlite"), ["never asked"])
    assert score(resumed).normalized == pytest.approx(0.75) and resumed.calls == 0  # a readable one is cached
