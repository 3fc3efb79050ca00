"""Data generation end to end: template teacher, self teacher (tiny model, transformers), OpenAI-compatible teacher
(a stub server on 127.0.0.1), filters with recorded reasons, DPO pairs, bad audio, kill-and-resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from emoreason.data.response_format import parse_response
from emoreason.data.schema import EmotionRecord, Vote, read_records
from emoreason.datagen.cli import main as datagen_main
from emoreason.datagen.filters import FilterConfig, contradictions, run_filters
from emoreason.datagen.config import ConfigError, load_config
from emoreason.datagen.pipeline import read_outputs
from emoreason.datagen.seed import load_pool

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "data_gen" / "configs" / "synthetic.yaml"
CUE_KEYS = {"pitch_hz", "pitch_level", "energy_dbfs", "energy_level", "rate_sps", "rate_level", "intonation",
            "pause_ratio"}


def run_cli(*args) -> int:
    return datagen_main(["--config", str(CONFIG), "--no-progress", *args])


@pytest.fixture(scope="module")
def template_run(synth_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("datagen-template")
    assert run_cli("--manifest", str(synth_corpus), "--out", str(out), "--set", "shard_size=64") == 0
    return out, read_outputs(out)


def test_template_teacher_produces_grounded_valid_records(template_run, synth_corpus):
    out, outputs = template_run
    inputs = read_records(synth_corpus)
    records, summary = outputs["records"], outputs["summary"]
    assert summary["inputs"] == len(inputs) and summary["kept"] == len(records)
    assert summary["kept"] >= 0.95 * len(inputs) and summary["bad_audio"] == 0
    pool = load_pool(REPO / "data_gen" / "instructions" / "emotion_reasoning.txt")
    by_id = {r.id: r for r in inputs}
    for record in records:
        source = by_id[record.id]
        assert record.task == "emotion_reasoning" and record.instruction in pool
        parsed = parse_response(record.response)
        assert parsed.valid, (record.id, parsed.errors)
        assert parsed.answer in {v.emotion for v in source.votes}
        assert parsed.distribution is not None and parsed.distribution == pytest.approx(
            {k: v for k, v in source.distribution.items() if v > 0}, abs=0.01)
        assert CUE_KEYS <= set(record.cues)
        assert record.cues["pitch_level"] in ("low", "normal", "high")
        assert record.cues["energy_level"] in ("soft", "normal", "loud")
        assert record.cues["rate_level"] in ("slow", "normal", "fast")
        # grounded: quotes the transcript, states only measured cue words, never contradicts them
        assert f'"{source.transcript}"' in parsed.think
        assert not contradictions(parsed.think, record.cues)
        assert any(record.cues[k] in parsed.think for k in ("pitch_level", "energy_level", "rate_level"))
        assert set(record.meta["provenance"]) >= {"teacher", "model", "prompt_id", "seed", "emoreason"}
        assert record.meta["provenance"]["teacher"] == "template"
        soft = record.meta["soft_label"]
        assert soft["num_classes"] == 4 and (soft["entropy"] == 0.0) == (len(parsed.distribution) == 1)
        assert soft["multi_label"] == [e for e, share in source.distribution.items() if share > 0.25]
    # varied phrasings, not one sentence pattern
    openers = {parse_response(r.response).think.split('"')[0] for r in records}
    conclusions = {parse_response(r.response).think.rsplit(".", 2)[-2].split(",")[0] for r in records}
    assert len(openers) >= 3 and len(conclusions) >= 3
    assert len({r.response for r in records}) == len(records)
    # parquet carries the same records
    assert [r.to_dict() for r in read_records(out / "records.parquet")] == [r.to_dict() for r in records]


def test_teacher_chats_pair_each_kept_rationale_with_the_prompt_that_asked_for_it(template_run):
    out, outputs = template_run
    chats = [json.loads(line) for line in (out / "teacher_chats.jsonl").read_text().splitlines()]
    records = {r.id: r for r in outputs["records"]}
    assert [c["id"] for c in chats] == list(records)  # one line per kept record, same order
    for chat in chats:
        record = records[chat["id"]]
        (user, assistant) = chat["messages"]
        assert chat["split"] == record.split and user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"] == record.response
        # the prompt the teacher saw: the seed description of this clip, its instruction and its target
        assert f'"{record.transcript}"' in user["content"] and record.instruction in user["content"]
        assert f"conclude that the emotion is {parse_response(record.response).answer}" in user["content"]
        assert f"Pitch: {record.cues['pitch_level']}" in user["content"]


def test_measured_cues_follow_the_rendered_prosody(template_run):
    _, outputs = template_run
    def share(emotion, cue, word):
        rows = [r for r in outputs["records"] if r.meta["rendered_emotion"] == emotion and not r.meta["blended_with"]]
        return sum(r.cues[cue] == word for r in rows) / len(rows)
    assert share("sad", "pitch_level", "low") > 0.6 and share("happy", "pitch_level", "high") > 0.6
    assert share("angry", "energy_level", "loud") > 0.6 and share("sad", "energy_level", "soft") > 0.6
    assert share("sad", "rate_level", "slow") > 0.6 and share("angry", "rate_level", "fast") > 0.6


def test_calibration_is_fitted_on_train_and_applied_to_test(template_run):
    out, outputs = template_run
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["split"] == "train"
    assert {"synthetic/female/pitch_hz", "synthetic/male/pitch_hz", "synthetic/energy_dbfs",
            "synthetic/rate_sps"} <= set(calibration["edges"])
    train_clips = sum(1 for r in outputs["records"] if r.split == "train")
    assert calibration["counts"]["synthetic/energy_dbfs"] >= train_clips  # fitted on train clips only...
    assert calibration["counts"]["synthetic/energy_dbfs"] < len(outputs["records"])  # ...not on all of them
    test_record = next(r for r in outputs["records"] if r.split == "test")
    assert test_record.meta["cue_calibration"]["pitch_level"] == f"synthetic/{test_record.gender}/pitch_hz"
    cooc = json.loads((out / "cooccurrence.json").read_text())
    assert set(cooc["labels"]) == {"neutral", "happy", "sad", "angry"}


def test_pairs_have_all_three_kinds_and_each_is_a_real_negative(template_run):
    _, outputs = template_run
    pairs = outputs["pairs"]
    kept = {r.id: r for r in outputs["records"]}
    assert len(pairs) >= 0.9 * len(kept)
    kinds = set()
    for pair in pairs:
        assert pair.response == kept[pair.id].response  # chosen = the accepted rationale
        votes = {v.emotion for v in pair.votes}
        for negative in pair.meta["rejected"]:
            kinds.add(negative["kind"])
            parsed = parse_response(negative["text"])
            assert parsed.valid
            if negative["kind"] == "hallucinated_cue":
                assert contradictions(parsed.think, pair.cues)
            elif negative["kind"] == "wrong_emotion":
                assert parsed.answer not in votes
            else:
                assert negative["kind"] == "spurious_cue" and parsed.answer in votes
    assert kinds == {"hallucinated_cue", "wrong_emotion", "spurious_cue"}


# -- filters -----------------------------------------------------------------------------------------------------
def _record():
    return EmotionRecord(id="r1", audio="a.wav", duration=2.0, corpus="c", label="angry",
                         votes=[Vote("a", "angry"), Vote("b", "angry"), Vote("c", "frustrated")],
                         distribution={"angry": 2 / 3, "frustrated": 1 / 3})


CUES = {"pitch_level": "high", "energy_level": "loud", "rate_level": "fast", "intonation": "falling",
        "pitch_variation": "expressive"}
GOOD = ("The speaker says the line quickly. The pitch is high, the volume is loud and the pace is fast, "
        "with a falling intonation. That sounds like someone losing patience.")


def _reason(think, answer="angry", cfg=None, seen=None, cues=CUES):
    text = f"<think>\n{think}\n</think>\n<answer>{answer}</answer>"
    _, failure = run_filters(text, _record(), cues, cfg or FilterConfig(), set() if seen is None else seen)
    return failure[0] if failure else None


def test_filters_record_a_reason_for_each_rejection():
    assert _reason(GOOD) is None
    assert _reason(GOOD, answer="frustrated") is None  # any voted emotion (default)
    assert _reason(GOOD, answer="frustrated", cfg=FilterConfig(answer_must_match="consensus")) == "answer"
    assert _reason(GOOD, answer="sad") == "answer"
    _, failure = run_filters("angry, I think", _record(), CUES, FilterConfig(), set())
    assert failure[0] == "format" and "missing_answer" in failure[1]
    assert _reason(GOOD + " Two of three annotators agree.") == "leakage"
    assert _reason(GOOD + " The label fits.") == "leakage"
    assert _reason("Angry is what I hear. " + GOOD) == "opens_with_answer"
    assert _reason(GOOD.replace("pitch is high", "pitch is low")) == "cue_contradiction"
    assert _reason(GOOD.replace("volume is loud", "volume is quiet")) == "cue_contradiction"
    assert _reason(GOOD.replace("falling intonation", "rising intonation")) == "cue_contradiction"
    assert _reason(GOOD + " The pitch is not low.") is None  # a negated claim is not a claim
    assert _reason("Too short to be useful.") == "length"
    assert _reason(" ".join(["word"] * 300)) == "length"
    seen = set()
    assert _reason(GOOD, seen=seen) is None
    from emoreason.datagen.filters import think_hash
    seen.add(think_hash(GOOD))
    assert _reason(GOOD, seen=seen) == "duplicate"
    assert _reason(GOOD, cfg=FilterConfig(require_distribution=True)) == "format"
    # The audio placeholder in a rationale (an endpoint teacher, or vLLM under Ray, may write it) is never a target.
    _, failure = run_filters(f"<think>\n{GOOD} The <audio> says it all.\n</think>\n<answer>angry</answer>", _record(),
                             CUES, FilterConfig(), set())
    assert failure == ("format", "audio_placeholder")
    assert _reason(GOOD + " The audio says it all.") is None


# -- config and CLI overrides ------------------------------------------------------------------------------------
def test_config_overrides_and_errors(tmp_path):
    cfg = load_config(CONFIG, ["teacher.name=self", "teacher.num_samples=4", "limit=8", "splits=[train]",
                               "filters.answer_must_match=consensus"])
    assert (cfg.teacher.name, cfg.teacher.num_samples, cfg.limit, cfg.splits) == ("self", 4, 8, ["train"])
    assert cfg.filters.answer_must_match == "consensus" and cfg.corpus.name == "synthetic"
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['nmu_samples'\] in teacher"):
        load_config(CONFIG, ["teacher.nmu_samples=4"])
    with pytest.raises(ConfigError, match="answer_must_match"):
        load_config(CONFIG, ["filters.answer_must_match=majority"])
    assert run_cli("--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")) == 2


# -- bad audio ---------------------------------------------------------------------------------------------------
def test_bad_audio_goes_to_errors_and_the_run_carries_on(synth_corpus, tmp_path):
    root = tmp_path / "corpus"
    good = read_records(synth_corpus)[:4]
    rows = []
    for r in good:
        (root / r.audio).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(synth_corpus.parent / r.audio, root / r.audio)
        rows.append({"id": r.id, "audio": r.audio, "label": r.label, "transcript": r.transcript,
                     "gender": r.gender, "duration": r.duration})
    (root / "garbage.wav").write_bytes(b"RIFF....not really a wav file at all")
    (root / "empty.wav").write_bytes(b"")
    rows.append({"id": "garbage", "audio": "garbage.wav", "label": "sad", "duration": 1.0})  # fails at analysis
    rows.append({"id": "empty", "audio": "empty.wav", "label": "sad"})  # fails at the header read
    rows.append({"id": "gone", "audio": "missing.wav", "label": "sad", "duration": 1.0})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert run_cli("--manifest", str(root / "m.jsonl"), "--out", str(out), "--set", "corpus.name=manifest",
                   "--set", "pairs.enabled=false") == 0
    outputs = read_outputs(out)
    errors = {e["id"]: e["reason"] for e in outputs["errors"]}
    assert set(errors) == {"garbage", "empty", "gone"}
    assert "unreadable" in errors["garbage"] and "file not found" in errors["gone"]
    assert "empty" in errors["empty"] or "unreadable" in errors["empty"]
    assert {r.id for r in outputs["records"]} == {r.id for r in good}
    assert outputs["summary"]["bad_audio"] == 1 and outputs["summary"]["bad_audio_all_clips"] == 3


# -- self teacher: the tiny model's backbone LLM through transformers ----------------------------------------------
def test_language_model_is_the_checkpoints_backbone(tiny, tiny_model_dir):
    import torch

    from emoreason.datagen.teachers import load_language_model

    model, _ = tiny
    lm, tokenizer = load_language_model(str(tiny_model_dir), device="cpu")
    ids = tokenizer("The pitch is high.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(lm(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_self_teacher_runs_end_to_end_and_filters_record_reasons(synth_corpus, tiny_model_dir, tmp_path,
                                                                 monkeypatch):
    from emoreason.datagen import teachers

    prompts = []
    original = teachers.SelfTeacher._generate_hf

    def spy(self, engine, requests):
        prompts.extend(r.prompt for r in requests)
        return original(self, engine, requests)

    monkeypatch.setattr(teachers.SelfTeacher, "_generate_hf", spy)
    out = tmp_path / "self"
    assert run_cli("--manifest", str(synth_corpus), "--out", str(out), "--teacher", "self", "--model",
                   str(tiny_model_dir), "--limit", "3", "--set", "teacher.backend=transformers",
                   "--set", "teacher.num_samples=2", "--set", "teacher.max_new_tokens=12",
                   "--set", "teacher.device=cpu") == 0
    outputs = read_outputs(out)
    assert len(prompts) == 3 and all("Annotators:" in p and "<answer>" in p for p in prompts)
    rejected = outputs["rejected"]
    assert len(rejected) == 6 and {r["sample"] for r in rejected} == {0, 1}
    assert all(r["reason"] in ("format", "answer", "leakage", "opens_with_answer", "cue_contradiction", "length",
                               "duplicate") and r["detail"] for r in rejected)
    assert any(r["text"].strip() for r in rejected)  # the LLM produced text; the filters judged it
    summary = outputs["summary"]
    assert summary["inputs"] == 3 and summary["kept"] + summary["dropped"] == 3
    assert summary["teacher"] == {"name": "self", "model": str(tiny_model_dir)}


# -- openai teacher against a stub OpenAI-compatible server ------------------------------------------------------
class _StubHandler(BaseHTTPRequestHandler):
    requests: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802 (http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "body": body})
        prompt = body["messages"][-1]["content"]
        target = re.search(r"<answer>(\w+)</answer>", prompt).group(1)
        opening = "The length of the clip says it all" if "Base the reasoning on this detail" in prompt else (
            "Listening to the whole sentence")
        text = (f"<think>\n{opening}, the delivery and the choice of words carry a clear "
                f"feeling that builds toward the end of the utterance.\n</think>\n<answer>{target}</answer>")
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                   for i in range(body.get("n", 1))]
        payload = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                              "choices": choices,
                              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def stub_server():
    _StubHandler.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", _StubHandler.requests
    server.shutdown()
    server.server_close()


def test_openai_teacher_against_a_compatible_endpoint(synth_corpus, tmp_path, stub_server):
    base_url, seen = stub_server
    out = tmp_path / "openai"
    assert run_cli("--manifest", str(synth_corpus), "--out", str(out), "--teacher", "openai", "--model",
                   "stub-model", "--limit", "4", "--set", f"teacher.base_url={base_url}",
                   "--set", "teacher.num_samples=2") == 0
    outputs = read_outputs(out)
    rationale_calls = [r for r in seen if r["body"]["n"] == 2]  # K samples per clip; negatives ask for one
    assert len(rationale_calls) == 4
    assert all("Annotators:" in r["body"]["messages"][-1]["content"] for r in rationale_calls)
    assert all(r["path"] == "/v1/chat/completions" and r["body"]["model"] == "stub-model" for r in seen)
    assert outputs["summary"]["kept"] == 4
    assert all(r.meta["provenance"]["teacher"] == "openai" and r.meta["provenance"]["model"] == "stub-model"
               for r in outputs["records"])
    # the stub never states a cue, so it cannot make a hallucinated-cue negative: recorded as unusable
    kinds = {n["kind"] for p in outputs["pairs"] for n in p.meta["rejected"]}
    assert kinds == {"wrong_emotion", "spurious_cue"}
    unusable = [u for p in outputs["pairs"] for u in p.meta.get("unusable_negatives", [])]
    assert len(unusable) == 4 and all(u["kind"] == "hallucinated_cue" and u["unusable"] == "states_no_false_cue"
                                      for u in unusable)


# -- kill and resume -----------------------------------------------------------------------------------------------
def _subprocess_run(synth_corpus, out, kill=None, limit=40):
    env = {k: v for k, v in os.environ.items() if k != "EMOREASON_DATAGEN_KILL_AFTER"}
    if kill:
        env["EMOREASON_DATAGEN_KILL_AFTER"] = kill
    cmd = [sys.executable, "-m", "emoreason.cli", "datagen", "--config", str(CONFIG), "--manifest",
           str(synth_corpus), "--out", str(out), "--limit", str(limit), "--no-progress", "--set", "shard_size=6",
           "--set", "teacher.num_samples=1"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.mark.slow
def test_killed_runs_resume_without_losing_or_duplicating(synth_corpus, tmp_path):
    clean = tmp_path / "clean"
    assert _subprocess_run(synth_corpus, clean).returncode == 0
    resumed = tmp_path / "resumed"
    first = _subprocess_run(synth_corpus, resumed, kill="acoustic:50")
    assert first.returncode == -9, first.stderr[-2000:]  # SIGKILL in the middle of the acoustic analysis
    second = _subprocess_run(synth_corpus, resumed, kill="generate:15")
    assert second.returncode == -9, second.stderr[-2000:]  # ...then in the middle of a generation shard
    assert not (resumed / "summary.json").exists()
    assert 0 < len(list((resumed / "shards").glob("0*"))) < 7
    third = _subprocess_run(synth_corpus, resumed)
    assert third.returncode == 0, third.stderr[-2000:]

    outputs = read_outputs(resumed)
    ids = [r.id for r in outputs["records"]]
    errors = [e["id"] for e in outputs["errors"]]
    dropped = {r["id"] for r in outputs["rejected"] if r["outcome"] == "dropped"}
    assert len(ids) == len(set(ids))
    planned = [i for shard in json.loads((resumed / "plan_generate.json").read_text()) for i in shard]
    assert len(planned) == 40 and sorted(set(ids) | dropped | set(errors) & set(planned)) == sorted(planned)
    assert not set(ids) & dropped
    # identical to the run that was never interrupted
    assert (resumed / "records.jsonl").read_text() == (clean / "records.jsonl").read_text()
    assert (resumed / "pairs.jsonl").read_text() == (clean / "pairs.jsonl").read_text()
    # resuming with different inputs is refused rather than mixing two plans
    changed = _subprocess_run(synth_corpus, resumed, limit=20)
    assert changed.returncode == 2 and "different generate plan" in changed.stderr


@pytest.mark.parametrize("path", sorted((REPO / "data_gen" / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_parses_and_names_real_adapter_options(path):
    import inspect

    from emoreason.data.corpora import get_adapter
    from emoreason.datagen.config import resolve_input
    from emoreason.datagen.teachers import TEACHERS

    cfg = load_config(path)
    accepted = set(inspect.signature(get_adapter(cfg.corpus.name)).parameters) - {"root"}
    assert set(cfg.corpus.options) <= accepted, (path.name, set(cfg.corpus.options) - accepted)
    assert cfg.teacher.name in TEACHERS
    for prompt_file in (cfg.prompt.template, cfg.prompt.spurious_template, cfg.prompt.instructions):
        assert resolve_input(prompt_file, cfg).is_file()


def test_self_teacher_vllm_backend_batches_one_offline_call(monkeypatch, tmp_path):
    """vLLM needs a GPU; a stand-in module checks what our code hands it: chat-templated prompts, one
    SamplingParams per request (n, seed), one batched generate call, outputs mapped back per request."""
    import types

    from emoreason.datagen.seed import SeedDescription
    from emoreason.datagen.teachers import SelfTeacher, TeacherConfig, TeacherRequest

    calls = {}

    class FakeTokenizer:
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert add_generation_prompt and not tokenize
            return "<user>" + messages[-1]["content"] + "<assistant>"

    class FakeLLM:
        def __init__(self, model, trust_remote_code, **kwargs):
            calls["init"] = (model, trust_remote_code, kwargs)

        def get_tokenizer(self):
            return FakeTokenizer()

        def generate(self, prompts, params, use_tqdm):
            calls.setdefault("generate", []).append((prompts, params))
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"{p}#{i}") for i in range(sp.n)])
                    for p, sp in zip(prompts, params)]

    fake = types.ModuleType("vllm")
    fake.LLM = FakeLLM
    fake.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    teacher = SelfTeacher(TeacherConfig(name="self", model=str(tmp_path), vllm_kwargs={"tensor_parallel_size": 2}))
    assert teacher.backend == "vllm"  # auto picks vLLM when it imports
    desc = SeedDescription(duration=1.0, transcript="Hi.", gender=None, cues={})
    requests = [TeacherRequest("a", "first", 2, 11, desc, "happy"), TeacherRequest("b", "second", 1, 12, desc, "sad")]
    outputs = teacher.generate(requests)
    assert outputs == [["<user>first<assistant>#0", "<user>first<assistant>#1"], ["<user>second<assistant>#0"]]
    assert calls["init"] == (str(tmp_path), False, {"tensor_parallel_size": 2})
    (prompts, params), = calls["generate"]
    assert [p.n for p in params] == [2, 1] and [p.seed for p in params] == [11, 12]


def test_workers_share_a_run_and_the_last_one_merges(synth_corpus, tmp_path):
    common = ["--manifest", str(synth_corpus), "--limit", "20", "--set", "shard_size=4"]
    assert run_cli(*common, "--out", str(tmp_path / "single")) == 0
    shared = tmp_path / "shared"
    assert run_cli(*common, "--out", str(shared), "--set", "num_workers=2", "--set", "worker_index=1") == 0
    assert sorted(p.name for p in (shared / "shards").iterdir()) == ["00001", "00003"]
    assert not (shared / "records.jsonl").exists()  # worker 0 has shards left
    assert run_cli(*common, "--out", str(shared), "--set", "num_workers=2", "--set", "worker_index=0") == 0
    assert (shared / "records.jsonl").read_text() == (tmp_path / "single" / "records.jsonl").read_text()
    assert json.loads((shared / "summary.json").read_text())["inputs"] == 20
    with pytest.raises(ConfigError, match="worker_index"):
        load_config(CONFIG, ["num_workers=2", "worker_index=2"])


@pytest.mark.parametrize("response", [
    "<think>\nThe pitch is high and the voice is loud.\n</think>\n<answer>angry</answer>",
    "<think>The pitch is high.</think><answer>angry</answer>\n<think>an unclosed afterthought",
    "<think>At first. <think>The pitch is high.</think><answer>angry</answer>",
])
def test_a_resumed_run_remembers_a_kept_rationale_as_the_filters_read_it(response):
    """``dedup_scope: run`` on a restart: the kept rationales of finished shards count as seen under the hash the
    duplicate filter gave them, so a resumed run rejects what the uninterrupted run would. The run used to split
    ``<think>`` by hand (after the last ``<think>``, up to the first ``</think>``), which read the last two
    (valid) responses differently from the filters."""
    from types import SimpleNamespace

    from emoreason.data.response_format import parse_response
    from emoreason.datagen.filters import think_hash
    from emoreason.datagen.generation import Generator

    parsed = parse_response(response, strict=True)
    assert parsed.valid
    resumed = SimpleNamespace(seen=set())
    Generator.remember_kept(resumed, response)
    assert resumed.seen == {think_hash(parsed.think)}


def test_tiny_backbone_served_over_an_openai_endpoint_as_teacher(synth_corpus, tiny, tmp_path, monkeypatch):
    """The self-generation path through a server: our transformers server hosts the tiny checkpoint, the openai
    teacher calls it (API key from the named environment variable), and the filters judge what comes back."""
    from emoreason.serve.app import create_app
    from emoreason.serve.background import BackgroundServer
    from emoreason.serve.engine import TransformersEngine

    model, processor = tiny
    engine = TransformersEngine(model, processor, max_batch_rows=8, batch_wait_s=0.02)
    app = create_app(engine, "tiny-teacher", api_key="secret-test-key", default_max_tokens=12)
    monkeypatch.setenv("DATAGEN_TEST_KEY", "secret-test-key")
    with BackgroundServer(app) as server:
        out = tmp_path / "served"
        assert run_cli("--manifest", str(synth_corpus), "--out", str(out), "--teacher", "openai", "--model",
                       "tiny-teacher", "--limit", "2", "--set", f"teacher.base_url={server.url}/v1",
                       "--set", "teacher.api_key_env=DATAGEN_TEST_KEY", "--set", "teacher.num_samples=2",
                       "--set", "teacher.max_new_tokens=12") == 0
        assert engine.rows_run >= 4  # 2 clips x 2 samples went through the served model
    outputs = read_outputs(out)
    summary = outputs["summary"]
    assert summary["inputs"] == 2 and summary["kept"] + summary["dropped"] == 2
    assert summary["teacher"] == {"name": "openai", "model": "tiny-teacher"}
    assert len(outputs["rejected"]) >= 2 * summary["dropped"] and all(r["detail"] for r in outputs["rejected"])
