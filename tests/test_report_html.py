"""report.html and `emoreason report compare` in a real headless Chromium (Debian's chromium + chromidriver, driven by
Selenium; nothing is downloaded): the page loads from file:// without a console error, filters count what report.json
counts, a clip's audio plays its duration, the compare page lists exactly the flipped clips, hostile text stays text,
and a 2,000-clip page is interactive in under 2 s.

The runs are scripted endpoints over the espeak-ng corpus (as tests/test_eval.py): three "checkpoints" whose answers
go wrong on different clips, rationales with cue claims checked against measured cues, one transcript and every
rationale carrying ``<script>`` and ``</td>``. Screenshots go to $EMOREASON_SCREENSHOTS (default
/tmp/emoreason-report-screenshots); the 2,000-clip load time is printed (run with -s) and written there.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import time
import zlib
from pathlib import Path

import pytest
import yaml

from emoreason.data.schema import read_records, write_records
from emoreason.eval import run_suite
from emoreason.eval.cli import report_main
from emoreason.eval.html_report import write_html
from emoreason.eval.scripted import create_scripted_app, last_user_text
from emoreason.serve.background import BackgroundServer

REPO = Path(__file__).resolve().parents[1]
LABELS = ["neutral", "happy", "sad", "angry"]
CHROMIUM = os.environ.get("EMOREASON_CHROMIUM", "/usr/bin/chromium")  # Debian's packages by default
CHROMEDRIVER = os.environ.get("EMOREASON_CHROMEDRIVER", "/usr/bin/chromedriver")
HOSTILE = "</td><script>window.__pwned = 1</script><b>bold?</b>"
SCREENSHOTS = Path(os.environ.get("EMOREASON_SCREENSHOTS", "/tmp/emoreason-report-screenshots"))
CUES = {"neutral": {"pitch_level": "normal", "energy_level": "normal", "rate_level": "normal"},
        "happy": {"pitch_level": "high", "energy_level": "loud", "rate_level": "fast"},
        "sad": {"pitch_level": "low", "energy_level": "soft", "rate_level": "slow"},
        "angry": {"pitch_level": "high", "energy_level": "loud", "rate_level": "fast"}}


def _browser_missing() -> str | None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (Path(p).is_file() and os.access(p, os.X_OK))]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    return ", ".join(missing) or None


@pytest.fixture(scope="module")
def browser():
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser tests, but {missing} is missing (make system-deps installs them)")
        pytest.skip(f"no headless browser here: {missing} missing (`make system-deps` installs chromium + "
                    "chromium-driver; the dev extra installs selenium)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look anything up: both paths are given
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--mute-audio",
                "--window-size=1500,1100", "--no-first-run", "--disable-extensions",
                "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def open_page(driver, path: Path, timeout: float = 30.0) -> float:
    """Load a page from file:// and wait until it is built; returns the wall-clock seconds that took."""
    start = time.perf_counter()
    driver.get(path.resolve().as_uri())
    while driver.execute_script("return document.body && document.body.dataset.ready") != "1":
        if time.perf_counter() - start > timeout:
            raise AssertionError(f"{path} never became ready; console: {driver.get_log('browser')}")
        time.sleep(0.01)
    return time.perf_counter() - start


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def choose(driver, select_id: str, value: str) -> int:
    """Pick a filter value; returns the count the page shows."""
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", select_id)).select_by_value(value)
    return int(driver.find_element("id", "count").text)


def shown_ids(driver) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('#clips tbody tr')].map(r => r.dataset.id)")


def audio_b64(body: dict) -> str:
    for message in body["messages"]:
        for part in message["content"] if isinstance(message["content"], list) else []:
            if part.get("type") == "input_audio":
                return part["input_audio"]["data"]
    raise AssertionError("no audio part")


def checkpoint_script(records_by_audio: dict, model: str, wrong_every: int):
    """A checkpoint that misses a model-specific set of clips (about 1 in ``wrong_every``) and reasons about the
    clip's cues (right or, on missed clips, with a contradicted rate claim)."""

    def script(body):
        record = records_by_audio[audio_b64(body)]
        missed = zlib.crc32(f"{record.id}/{model}".encode()) % wrong_every == 0
        label = LABELS[(LABELS.index(record.label) + 1) % 4] if missed else record.label
        if "emotion only" in last_user_text(body):
            return [f"<answer>{label}</answer>"] * body.get("n", 1)
        cues = CUES[record.label]
        rate = "slow" if missed and cues["rate_level"] != "slow" else cues["rate_level"]
        think = (f"The pitch is {cues['pitch_level']} and the speaking rate is {rate}; the intonation is rising. "
                 f"{HOSTILE} So the voice sounds {label}.")
        return [f"<think>{think}</think><answer>{label}</answer>"] * body.get("n", 1)

    return script


@pytest.fixture(scope="module")
def runs(synth_corpus, tmp_path_factory):
    """Three evaluated checkpoints (sft, grpo, dpo) over the corpus's test clips, and their compare pages."""
    root = tmp_path_factory.mktemp("report-runs")
    records = read_records(synth_corpus)
    for r in records:
        r.cues = dict(CUES[r.label]) if r.label in CUES else {}
    hostile = next(r for r in records if r.split == "test")
    hostile.transcript = f"She said {HOSTILE} & left"
    manifest = root / "records.jsonl"
    write_records(records, manifest)
    data_root = synth_corpus.parent
    test_records = [r for r in records if r.split == "test"]
    by_audio = {base64.b64encode(r.audio_path(data_root).read_bytes()).decode(): r for r in test_records}
    suite = {"name": "synthetic-browser", "records": str(manifest), "split": "test", "labels": LABELS,
             "prompts": str(REPO / "eval/prompts/emotion.yaml"), "max_tokens": 64, "concurrency": 4, "retries": 1,
             "strategies": ["direct", "cot_greedy", {"name": "self_consistency", "n": 3}],
             "metrics": ["classification", "distribution", "calibration", "ambiguity", "groups", "reasoning"],
             "group_by": ["gender"]}
    suite_path = root / "suite.yaml"
    suite_path.write_text(yaml.safe_dump(suite))
    out = {}
    for model, wrong_every in (("sft", 3), ("grpo", 5), ("dpo", 4)):
        app = create_scripted_app(checkpoint_script(by_audio, model, wrong_every), model=model)
        with BackgroundServer(app) as server:
            run_suite(suite_path, server.url + "/v1", model, root / "eval" / model, data_root=str(data_root),
                      progress=False)
        out[model] = root / "eval" / model
    for a, b in (("sft", "grpo"), ("grpo", "dpo")):
        assert report_main(["compare", str(out[a]), str(out[b]), "--out", str(root / f"compare-{a}-{b}"),
                            "--labels", a.upper(), b.upper()]) == 0
    return {"root": root, "hostile_id": hostile.id, **out}


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# -- without a browser -----------------------------------------------------------------------------------------------

def test_report_json_has_an_interval_and_n_for_every_headline_metric(runs):
    report = load(runs["dpo"] / "report.json")
    assert report["bootstrap"]["draws"] == 1000 and report["bootstrap"]["n"] == report["items"]
    for name, s in report["strategies"].items():
        assert "intervals_skipped" not in s, s.get("intervals_skipped")  # every clip statistic = the module's figure
        for metric in ("classification.accuracy", "classification.balanced_accuracy", "classification.macro_f1",
                       "distribution.js_divergence", "calibration.ece", "calibration.brier",
                       "reasoning.format_validity", "tokens.total_per_item"):
            interval = s["intervals"][metric]
            assert interval["low"] <= interval["estimate"] <= interval["high"] and interval["n"] == report["items"]
        if name != "direct":
            assert s["intervals"]["reasoning.cue_hallucination_rate"]["denominator"]["cue_claims"] == \
                s["metrics"]["reasoning"]["cue_claims"]
    md = (runs["dpo"] / "report.md").read_text()
    acc = report["strategies"]["cot_greedy"]["intervals"]["classification.accuracy"]
    assert f"[{acc['low']:.3f}, {acc['high']:.3f}]" in md and "1000 draws" in md


def test_cue_claims_in_the_page_are_the_cue_readers_verdicts(runs):
    from emoreason.data.cues import ground
    from emoreason.data.response_format import parse_response

    report = load(runs["sft"] / "report.json")
    verdicts = set()
    for clip in report["clips"]:
        s = clip["strategies"]["cot_greedy"]
        checked = ground(parse_response(s["rationale"]).think, CUES[clip["label"]])
        expected = sorted([("supported", c.cue, c.level) for c in checked.supported]
                          + [("contradicted", c.cue, c.level) for c in checked.contradicted]
                          + [("unmeasured", c.cue, c.level) for c in checked.unchecked])
        assert sorted((c["verdict"], c["cue"], c["level"]) for c in s["claims"]) == expected
        verdicts |= {c["verdict"] for c in s["claims"]}
    assert verdicts == {"supported", "contradicted", "unmeasured"}  # the fixture exercises all three


def test_compare_json_flips_and_tests(runs):
    result = load(runs["root"] / "compare-sft-grpo" / "compare.json")
    a, b = load(runs["sft"] / "report.json"), load(runs["grpo"] / "report.json")
    right_b = {c["id"]: c["strategies"]["cot_greedy"]["scores"]["correct"] for c in b["clips"]}
    expected = sorted(c["id"] for c in a["clips"] if c["strategies"]["cot_greedy"]["scores"]["correct"]
                      and not right_b[c["id"]])
    s = result["strategies"]["cot_greedy"]
    assert sorted(s["flips"]["right_to_wrong"]) == expected
    acc = s["differences"]["classification.accuracy"]
    assert acc["test"] == "McNemar" and acc["p_value"] == s["mcnemar"]["p_value"]
    assert acc["difference"] == pytest.approx(b["strategies"]["cot_greedy"]["metrics"]["classification"]["accuracy"]
                                              - a["strategies"]["cot_greedy"]["metrics"]["classification"]["accuracy"])
    assert acc["low"] <= acc["difference"] <= acc["high"]
    assert "| cot_greedy | classification.accuracy |" in (runs["root"] / "compare-sft-grpo" / "compare.md").read_text()


def test_hostile_text_never_reaches_the_markup_unescaped(runs):
    html = (runs["sft"] / "report.html").read_text()
    assert "<script>window.__pwned" not in html and "</td><script>" not in html
    assert html.count("<script") == 2  # the data block and the page's own script


# -- in the browser ----------------------------------------------------------------------------------------------------

def test_page_loads_from_file_without_errors_and_filters_count_what_report_json_counts(browser, runs):
    report = load(runs["dpo"] / "report.json")
    open_page(browser, runs["dpo"] / "report.html")
    assert console_errors(browser) == []
    assert int(browser.find_element("id", "count").text) == report["items"] == len(report["clips"])
    strategy = "cot_greedy"
    s = report["strategies"][strategy]
    choose(browser, "f-strategy", strategy)
    matrix = s["metrics"]["classification"]["confusion_matrix"]
    for i, label in enumerate(LABELS):  # emotion x correct = the confusion matrix's cells
        assert choose(browser, "f-emotion", label) == sum(matrix[i])
        assert choose(browser, "f-correct", "correct") == matrix[i][i]
        assert choose(browser, "f-correct", "wrong") == sum(matrix[i]) - matrix[i][i]
        choose(browser, "f-correct", "")
    choose(browser, "f-emotion", "")
    ambiguity = s["metrics"]["ambiguity"]
    for name in ambiguity["bin_order"]:  # ambiguity bins = the metric's bins, correct share = its accuracy
        group = ambiguity["by_group"][name]
        assert choose(browser, "f-bin", name) == group["count"]
        assert choose(browser, "f-correct", "correct") == round(group["accuracy"] * group["count"])
        choose(browser, "f-correct", "")
    choose(browser, "f-bin", "")
    for gender, group in s["metrics"]["groups"]["gender"]["by_group"].items():
        assert choose(browser, "f-group-gender", gender) == group["count"]
    choose(browser, "f-group-gender", "")
    disagree = sum(len({st["prediction"] for st in c["strategies"].values()}) > 1 for c in report["clips"])
    browser.find_element("id", "f-disagree").click()
    assert int(browser.find_element("id", "count").text) == disagree
    browser.find_element("id", "f-disagree").click()
    search = browser.find_element("id", "f-search")
    search.send_keys(runs["hostile_id"])
    assert shown_ids(browser) == [runs["hostile_id"]]
    search.clear()
    search.send_keys(" ")  # clear() fires no input event
    search.send_keys("\b")
    assert int(browser.find_element("id", "count").text) == report["items"]
    assert console_errors(browser) == []


LOAD_FIRST_AUDIO = """
    const done = arguments[arguments.length - 1];
    const audio = document.querySelector('#clips tbody tr audio');
    audio.preload = 'auto';
    audio.addEventListener('error', () => done({error: audio.error && audio.error.code}));
    audio.addEventListener('canplay', () => done({readyState: audio.readyState, duration: audio.duration}));
    audio.load();
    setTimeout(() => done({timeout: true, readyState: audio.readyState}), 20000);
"""


def test_audio_element_plays_the_clip(browser, runs):
    report = load(runs["sft"] / "report.json")
    clip = report["clips"][0]
    open_page(browser, runs["sft"] / "report.html")
    state = browser.execute_async_script(LOAD_FIRST_AUDIO)
    assert state.get("readyState", 0) >= 2, state
    assert state["duration"] == pytest.approx(clip["duration"], abs=0.05)
    assert console_errors(browser) == []
    # --embed-audio: the same clip from a data URI inside the page
    embedded = write_html(report, runs["sft"], embed_audio=True, name="report-embedded.html")
    assert "data:audio/wav;base64," in embedded.read_text()
    open_page(browser, embedded)
    state = browser.execute_async_script(LOAD_FIRST_AUDIO)
    assert state.get("readyState", 0) >= 2 and state["duration"] == pytest.approx(clip["duration"], abs=0.05), state


def test_hostile_transcript_and_rationale_render_as_text(browser, runs):
    open_page(browser, runs["sft"] / "report.html")
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "f-strategy")).select_by_value("cot_greedy")
    browser.find_element("id", "f-search").send_keys(runs["hostile_id"])
    row = browser.find_element("css selector", "#clips tbody tr")
    assert HOSTILE in row.find_element("css selector", ".transcript").text
    assert HOSTILE in row.find_element("css selector", ".rationale").text
    assert browser.execute_script("return window.__pwned") is None
    assert browser.execute_script("return document.scripts.length") == 2
    assert browser.execute_script("return document.querySelectorAll('#clips b').length") == \
        len(browser.find_elements("css selector", "#clips .answer b"))  # no <b> from the text
    assert len(row.find_elements("css selector", "td")) == 5  # "</td>" split no cell
    assert console_errors(browser) == []


def test_compare_page_lists_exactly_the_flipped_clips(browser, runs):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for pair in ("sft-grpo", "grpo-dpo"):
        folder = runs["root"] / f"compare-{pair}"
        result = load(folder / "compare.json")
        open_page(browser, folder / "report.html")
        assert console_errors(browser) == []
        choose(browser, "f-strategy", "cot_greedy")
        flips = result["strategies"]["cot_greedy"]["flips"]
        for kind in ("right_to_wrong", "wrong_to_right"):
            assert choose(browser, "f-flip", kind) == len(flips[kind])
            assert sorted(shown_ids(browser)) == sorted(flips[kind])
        assert choose(browser, "f-flip", "flipped") == len(flips["right_to_wrong"]) + len(flips["wrong_to_right"])
        rows = browser.find_elements("css selector", "#differences tr")
        assert any("McNemar" in r.text for r in rows)
        state = browser.execute_async_script(LOAD_FIRST_AUDIO)  # audio paths rebased onto the compare folder
        assert state.get("readyState", 0) >= 2, state
        if pair == "sft-grpo":
            browser.save_screenshot(str(SCREENSHOTS / "compare_sft_grpo.png"))
            browser.execute_script("document.getElementById('controls').scrollIntoView()")
            browser.save_screenshot(str(SCREENSHOTS / "compare_sft_grpo_flips.png"))


def test_screenshot_of_a_demo_like_page(browser, runs):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    open_page(browser, runs["dpo"] / "report.html")
    browser.save_screenshot(str(SCREENSHOTS / "report_dpo_top.png"))
    browser.execute_script("document.getElementById('controls').scrollIntoView()")
    browser.save_screenshot(str(SCREENSHOTS / "report_dpo_clips.png"))
    assert (SCREENSHOTS / "report_dpo_clips.png").stat().st_size > 10_000


def test_a_2000_clip_page_is_interactive_in_under_2_seconds(browser, runs, tmp_path):
    """2,000 clips (the run's clips repeated under new ids, every strategy's rationale included; audio not embedded):
    from navigation start to the first frame painted with the rows (the browser's own clock: reading and parsing
    the 7 MB file, the JSON, building, laying out and painting the first 100 rows), plus one filter applied and
    re-rendered, under 2 s. The WebDriver round trips around it are reported, not
    counted: they are the test harness, not the page."""
    report = load(runs["dpo"] / "report.json")
    clips = []
    for i in range(2000):
        clip = copy.deepcopy(report["clips"][i % len(report["clips"])])
        clip["id"] = f"{clip['id']}#{i}"
        clips.append(clip)
    big = dict(report, clips=clips, items=len(clips))
    folder = tmp_path / "big"
    shutil.copytree(runs["dpo"] / "plots", folder / "plots")
    page = write_html(big, folder)
    size_mb = page.stat().st_size / 1e6
    load_s = open_page(browser, page)
    ready_ms = browser.execute_script("return window.__reportInteractiveMs")
    start = time.perf_counter()
    wrong = choose(browser, "f-correct", "wrong")
    filter_s = time.perf_counter() - start
    filter_ms = browser.execute_script("return window.__lastRenderMs")
    assert wrong == sum(not c["strategies"]["cot_greedy"]["scores"]["correct"] for c in clips)
    assert console_errors(browser) == []
    figure = (f"2,000-clip report.html ({size_mb:.1f} MB): interactive {ready_ms:.0f} ms after navigation start, "
              f"one filter re-rendered in {filter_ms:.0f} ms (in the page); through WebDriver: get -> ready "
              f"{load_s * 1000:.0f} ms, select + read the count {filter_s * 1000:.0f} ms")
    print(figure)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    (SCREENSHOTS / "load_time_2000_clips.txt").write_text(figure + "\n")
    assert ready_ms + filter_ms < 2000, figure


def test_demo_report_compares_sft_grpo_dpo_with_intervals(runs, tmp_path):
    """The demo report's chain section (emoreason.demo.report.checkpoint_comparison) over three evaluated runs: each
    pair's page exists, and each row's figures are the comparison's own."""
    from emoreason.demo.report import CHAIN, checkpoint_comparison

    lines = checkpoint_comparison({name: runs[name] for name in ("sft", "grpo", "dpo")}, tmp_path / "compare",
                                  relative_to=tmp_path)
    text = "\n".join(lines)
    for a, b in CHAIN:
        result = load(tmp_path / "compare" / f"{a}-{b}" / "compare.json")
        acc = result["strategies"]["cot_greedy"]["differences"]["classification.accuracy"]
        assert (f"| {a} -> {b} | classification.accuracy | {acc['a']:.3f} | {acc['b']:.3f} | "
                f"{acc['difference']:+.3f} | [{acc['low']:+.3f}, {acc['high']:+.3f}] | {acc['p_value']:.3f} | "
                "McNemar |") in text
        assert f"compare/{a}-{b}/report.html" in text
    print("\n" + text)
