"""The one cue vocabulary and claim reader (emoreason.data.cues): a table of sentences and their claims, and the proof
that the datagen filter, the GRPO cue_grounding reward, the heuristic judge and the evaluator's reasoning metric reach
the same verdict on every row, because they all run that code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emoreason.data.cues import (
    CUES,
    Claim,
    argued_emotion,
    extract_claims,
    ground,
    level_of,
    measured_levels,
    stated_emotions,
)

P, V, E, R, I, PA = "pitch_level", "pitch_variation", "energy_level", "rate_level", "intonation", "pauses"

# sentence -> expected claims; "!" marks a negated claim. Order-free, each claim once.
TABLE: list[tuple[str, set[str]]] = [
    ("The pitch is high.", {f"{P}=high"}),
    ("The pitch is not high.", {f"!{P}=high"}),
    ("Her pitch isn't particularly high.", {f"!{P}=high"}),
    ("The pitch is neither high nor low.", {f"!{P}=high", f"!{P}=low"}),
    ("The pitch is high, not low.", {f"{P}=high", f"!{P}=low"}),
    ("The pitch is low rather than high.", {f"{P}=low", f"!{P}=high"}),
    ("No sign of a raised pitch.", {f"!{P}=high"}),
    ("High pitch and a loud voice.", {f"{P}=high", f"{E}=loud"}),
    ("She sounds sad, not angry.", set()),
    ("The pitch is low, sad, not angry.", {f"{P}=low"}),
    ("The answer is other.", set()),
    ("I would call the emotion other: the rate is normal.", {f"{R}=normal"}),
    ("Other than a slightly raised pitch, nothing stands out.", {f"{P}=high"}),
    ("The pitch is high; the other cues are unremarkable.", {f"{P}=high"}),
    ("The pitch is high. Again, the pitch is high.", {f"{P}=high"}),
    ("The pitch is high, the pitch is HIGH.", {f"{P}=high"}),
    ("Her pitch range is narrow.", {f"{V}=monotone"}),
    ("A wide pitch range.", {f"{V}=expressive"}),
    ("The delivery is monotone.", {f"{V}=monotone"}),
    ("The pitch variation is normal.", {f"{V}=normal"}),
    ("The pitch range is wide and the pitch is high.", {f"{V}=expressive", f"{P}=high"}),
    ("She speaks quickly.", {f"{R}=fast"}),
    ("He talks slowly and softly.", {f"{R}=slow", f"{E}=soft"}),
    ("The speaking rate is fast.", {f"{R}=fast"}),
    ("The pace is not fast.", {f"!{R}=fast"}),
    ("She is not speaking fast.", {f"!{R}=fast"}),
    ("The tempo is rapid.", {f"{R}=fast"}),
    ("Fast-paced speech.", {f"{R}=fast"}),
    ("The volume is low.", {f"{E}=soft"}),
    ("The voice is loud.", {f"{E}=loud"}),
    ("She speaks quietly.", {f"{E}=soft"}),
    ("The loudness is moderate.", {f"{E}=normal"}),
    ("High energy in the voice.", {f"{E}=loud"}),
    ("She does not sound loud.", {f"!{E}=loud"}),
    ("The pitch is high and the volume is high.", {f"{P}=high", f"{E}=loud"}),
    ("Angry? No, the voice is calm and quiet.", {f"{E}=soft"}),
    ("The volume is soft, the rate slow and the pitch low.", {f"{E}=soft", f"{R}=slow", f"{P}=low"}),
    ("Quiet, slow speech with a low pitch.", {f"{E}=soft", f"{R}=slow", f"{P}=low"}),
    ("The intonation is rising.", {f"{I}=rising"}),
    ("The pitch rises at the end.", {f"{I}=rising"}),
    ("A falling intonation contour.", {f"{I}=falling"}),
    ("A rise-fall intonation.", {f"{I}=rise-fall"}),
    ("The intonation is flat.", {f"{I}=flat"}),
    ("The contour is not falling but rising.", {f"!{I}=falling", f"{I}=rising"}),
    ("There are long pauses.", {f"{PA}=long pauses"}),
    ("She speaks without pauses.", {f"{PA}=fluent"}),
    ("The speech is fluent.", {f"{PA}=fluent"}),
    ("The pitch is slightly high.", {f"{P}=high"}),
    ("The pitch seems somewhat low.", {f"{P}=low"}),
    ("Her voice has a deep pitch.", {f"{P}=low"}),
    ("It sounds happy because the pitch is higher than usual.", {f"{P}=high"}),
    ("Loud and high-pitched.", {f"{E}=loud", f"{P}=high"}),
    ("The words are about a meeting.", set()),
    # emphatic phrasing is not a denial
    ('The voice is not only loud but also fast.', {f"{E}=loud", f"{R}=fast"}),
    ('Not only is the pitch high, it is also rising.', {f"{P}=high", f"{I}=rising"}),
    ('The pitch is not just high but shrill.', {f"{P}=high"}),
    ('I have never heard such a loud voice.', {f"{E}=loud"}),
    ('I have never heard a voice so loud.', {f"{E}=loud"}),
    ("The pitch couldn't be higher.", {f"{P}=high"}),
    ('The volume could not be louder.', {f"{E}=loud"}),
    ("She couldn't speak any faster.", {f"{R}=fast"}),
    ("You can't miss the high pitch.", {f"{P}=high"}),
    ('One cannot ignore how quietly she speaks.', {f"{E}=soft"}),
    ('There is no denying the loud volume.', {f"{E}=loud"}),
    ('Without doubt a high pitch.', {f"{P}=high"}),
    ('Without a doubt the pace is rapid.', {f"{R}=fast"}),
    ('No doubt the pitch is low.', {f"{P}=low"}),
    ('There is no question that the tempo is slow.', {f"{R}=slow"}),
    ('It is impossible to overlook the deep pitch.', {f"{P}=low"}),
    # negators with a scope that ends at contrast words and clause breaks
    ('The pitch is not high; the volume is loud.', {f"!{P}=high", f"{E}=loud"}),
    ('The pitch is not high but the volume is loud.', {f"!{P}=high", f"{E}=loud"}),
    ('She does not speak quickly, yet the pitch is high.', {f"!{R}=fast", f"{P}=high"}),
    ('The volume is never loud, while the pitch stays low.', {f"!{E}=loud", f"{P}=low"}),
    ('The voice is not loud and the speaking rate is slow.', {f"!{E}=loud", f"{R}=slow"}),
    ('The pitch is not high, though the rate is fast.', {f"!{P}=high", f"{R}=fast"}),
    ("The tempo isn't slow, and the intonation is falling.", {f"!{R}=slow", f"{I}=falling"}),
    ('There are no long pauses and the speech is fluent.', {f"!{PA}=long pauses", f"{PA}=fluent"}),
    ("The pitch isn't very high at all.", {f"!{P}=high"}),
    ('The speaking rate is not particularly or unusually fast.', {f"!{R}=fast"}),
    ('The volume is not what I would call loud.', {f"!{E}=loud"}),
    # negators the old reader missed: nothing, less, far from, hardly, none
    ('Nothing suggests a high pitch.', {f"!{P}=high"}),
    ('Nothing in the delivery sounds rushed.', {f"!{R}=fast"}),
    ('The voice is less loud than usual.', {f"!{E}=loud"}),
    ('She speaks less quickly than before.', {f"!{R}=fast"}),
    ('The pitch is far from low.', {f"!{P}=low"}),
    ('The pace is far from slow.', {f"!{R}=slow"}),
    ('The pitch is hardly raised.', {f"!{P}=high"}),
    ('The volume is barely louder than a whisper.', {f"!{E}=loud"}),
    ('None of the pitch sounds elevated.', {f"!{P}=high"}),
    ('The speech is free of hesitations.', {f"{PA}=fluent"}),
    ('The speaking rate is no longer slow.', {f"!{R}=slow"}),
    ('There is no trace of a loud voice.', {f"!{E}=loud"}),
    ('The pitch lacks any shrill quality.', {f"!{P}=high"}),
    ('The volume is more or less normal.', {f"{E}=normal"}),
    # questions are not claims
    ('Is the volume loud? No, it is soft.', {f"{E}=soft"}),
    ('Is the pitch high? Not at all.', set()),
    ('Does she speak fast? She speaks slowly.', {f"{R}=slow"}),
    ('Could the low pitch mean sadness? The volume is loud.', {f"{E}=loud"}),
    ('Why is the pace so rapid?', set()),
    ('Is the intonation rising? It is falling.', {f"{I}=falling"}),
    # quoted text and words about the transcript are not cue claims
    ("The words 'loud' and 'fast' appear in the transcript.", set()),
    ('The transcript says "speak louder".', set()),
    ('She says "I am so happy" in a loud voice.', {f"{E}=loud"}),
    ('The phrase "slow down" is spoken quickly.', {f"{R}=fast"}),
    ('The word ‘high’ is mentioned.', set()),
    ('She speaks about a fast car.', set()),
    ('He talks about how loud the party was.', set()),
    ('The text mentions a low salary.', set()),
    ('The transcript describes a slow day.', set()),
    ('She mentions a high mountain, and her pitch is low.', {f"{P}=low"}),
    ('The transcript is about a quiet evening, but the voice is loud.', {f"{E}=loud"}),
    # anchors need a prosodic noun
    ('The emotional intensity is high.', set()),
    ('The intensity of her voice is high.', {f"{E}=loud"}),
    ('Her vocal intensity is low.', {f"{E}=soft"}),
    ('She shows a wide range of emotions.', set()),
    ('Her vocal range is wide.', {f"{V}=expressive"}),
    ('The range of her voice is narrow.', {f"{V}=monotone"}),
    ('A limited range of topics is covered.', set()),
    ('The frequency of her pauses is high.', set()),
    ('The frequency of her voice is high.', {f"{P}=high"}),
    ('Her speech is very fast.', {f"{R}=fast"}),
    ('Careful, slow speech.', {f"{R}=slow"}),
    ('He talks quickly.', {f"{R}=fast"}),
    ('She talks to a slow waiter.', set()),
    ('The speech is about a rapid change.', set()),
    ('She speaks in a high register.', {f"{P}=high"}),
    # neither X nor Y gives both; X rather than Y gives X
    ('Neither the pitch nor the volume is high.', {f"!{P}=high", f"!{E}=loud"}),
    ('Neither the pace nor the tempo is fast.', {f"!{R}=fast"}),
    ('The pitch and the volume are both high.', {f"{P}=high", f"{E}=loud"}),
    ('The pitch and volume are low.', {f"{P}=low", f"{E}=soft"}),
    ('The volume, rather than the pitch, is high.', {f"{E}=loud"}),
    ('The volume rather than the pitch is high.', {f"{E}=loud"}),
    ('The pitch, not the volume, is high.', {f"{P}=high"}),
    ('The pitch, instead of the volume, is raised.', {f"{P}=high"}),
    ('The pace rather than the volume is fast.', {f"{R}=fast"}),
    ('The volume is loud rather than soft.', {f"{E}=loud", f"!{E}=soft"}),
    ('She speaks fast instead of slowly.', {f"{R}=fast", f"!{R}=slow"}),
    # the voice as a subject: a word only one cue uses
    ('The voice is deep.', {f"{P}=low"}),
    ('A weak, faint voice.', {f"{E}=soft"}),
    ('The voice is deep and weak.', {f"{P}=low", f"{E}=soft"}),
    ('Her voice is quiet and slow.', {f"{E}=soft", f"{R}=slow"}),
    ('The voice is high.', set()),
    # hedges and plain claims in teacher phrasing
    ('The pitch seems slightly elevated.', {f"{P}=high"}),
    ('The speaking rate appears somewhat rushed.', {f"{R}=fast"}),
    ('Perhaps the volume is a bit quiet.', {f"{E}=soft"}),
    ('Her pitch is probably normal.', {f"{P}=normal"}),
    ('The tempo is moderate.', {f"{R}=normal"}),
    ('The pace is steady.', {f"{R}=normal"}),
    ('The loudness is average.', {f"{E}=normal"}),
    ('The pitch variation is limited.', {f"{V}=monotone"}),
    ('The pitch range is broad.', {f"{V}=expressive"}),
    ('The pitch modulation is narrow.', {f"{V}=monotone"}),
    ('The melody is flat.', {f"{I}=flat"}),
    ('The intonation contour falls.', {f"{I}=falling"}),
    ('There is a fall-rise intonation.', {f"{I}=fall-rise"}),
    ('The pitch drops at the end.', {f"{I}=falling"}),
    ('Her pitch rises sharply.', {f"{I}=rising"}),
    ('There are occasional pauses.', {f"{PA}=some pauses"}),
    ('The pauses are frequent.', {f"{PA}=long pauses"}),
    ('She speaks without pausing.', {f"{PA}=fluent"}),
    ('She speaks fluently.', {f"{PA}=fluent"}),
    ('Her delivery is hesitant.', {f"{PA}=long pauses"}),
    ('Her speech is fluent and smooth.', {f"{PA}=fluent"}),
    ('There are a few brief pauses.', {f"{PA}=some pauses"}),
    ('The volume is forceful.', {f"{E}=loud"}),
    ('She speaks loudly and rapidly.', {f"{E}=loud", f"{R}=fast"}),
    ('The voice is hushed.', {f"{E}=soft"}),
    ('A sluggish pace.', {f"{R}=slow"}),
    ('A hurried tempo.', {f"{R}=fast"}),
    ('The pitch is mid-range.', {f"{P}=normal"}),
    ('A shrill pitch.', {f"{P}=high"}),
    ('The energy is low.', {f"{E}=soft"}),
    ('The amplitude is high.', {f"{E}=loud"}),
    ('High pitch, loud volume, fast rate.', {f"{P}=high", f"{E}=loud", f"{R}=fast"}),
    ('Low pitch, soft volume and a slow pace.', {f"{P}=low", f"{E}=soft", f"{R}=slow"}),
    ('The volume is loud, not soft.', {f"{E}=loud", f"!{E}=soft"}),
    ('The rate is slow, not fast.', {f"{R}=slow", f"!{R}=fast"}),
    ('The pitch is low, not high, and the volume is soft.', {f"{P}=low", f"!{P}=high", f"{E}=soft"}),
    # emotions and the word other are not cue claims
    ('She sounds angry rather than sad.', set()),
    ('It is sadness, not anger.', set()),
    ('The emotion could be other.', set()),
    ('In other words, the pitch is high.', {f"{P}=high"}),
    ('The other speaker is loud.', {f"{E}=loud"}),
    ('The answer is happy because the voice is loud.', {f"{E}=loud"}),
    # manner adverbs after a content word are still the voice; "about" as "roughly" is no content word
    ('She says it loudly.', {f"{E}=loud"}),
    ('Does she speak loudly? Yes.', set()),
    ('The speaking rate is about normal.', {f"{R}=normal"}),
    ('The pitch is about 200 Hz, which is high.', {f"{P}=high"}),
    # a negation's scope ends at "except" and after the noun a "no" / "without" heads
    ('Nothing stands out except the high pitch.', {f"{P}=high"}),
    ('She speaks without hesitation at a fast pace.', {f"{PA}=fluent", f"{R}=fast"}),
    ('There is no high pitch or loud volume.', {f"!{P}=high", f"!{E}=loud"}),
    ('With no pauses and a fast tempo, she sounds excited.', {f"{PA}=fluent", f"{R}=fast"}),
    ('No hesitation, and the tempo is rapid.', {f"{PA}=fluent", f"{R}=fast"}),
]

# Two measurements that between them make every claim above both true and false.
MEASURED = {
    "aroused": {P: "high", V: "monotone", E: "loud", R: "fast", I: "rising", PA: "fluent"},
    "subdued": {P: "low", V: "expressive", E: "soft", R: "slow", I: "falling", PA: "long pauses"},
}


def as_strings(claims: list[Claim]) -> set[str]:
    return {f"{'!' if c.negated else ''}{c.cue}={c.level}" for c in claims}


def test_the_table_is_large_and_covers_each_kind_of_sentence():
    assert len(TABLE) >= 150
    expected = set().union(*(claims for _, claims in TABLE))
    assert {c.split("=")[0].lstrip("!") for c in expected} == set(CUES)  # every cue appears
    assert any(c.startswith("!") for c in expected) and any(not claims for _, claims in TABLE)


@pytest.mark.parametrize("sentence,expected", TABLE, ids=[s for s, _ in TABLE])
def test_extractor_reads_each_sentence(sentence, expected):
    claims = extract_claims(sentence)
    assert as_strings(claims) == expected
    assert len(claims) == len(expected)  # repeated claims are counted once


def test_hedges_are_kept_and_marked():
    hedged = extract_claims("The pitch seems somewhat low, and the volume is loud.")
    assert [(c.cue, c.level, c.hedged) for c in hedged] == [(P, "low", True), (E, "loud", False)]


def test_a_negation_is_checked_against_the_measurement_but_earns_nothing():
    cues = {P: "high"}
    wrong = ground("The pitch is not high.", cues)
    assert [c.key for c in wrong.contradicted] == [(P, "high", True)] and not wrong.supported
    consistent = ground("The pitch is not low.", cues)
    assert consistent.checked == 0 and [c.key for c in consistent.unchecked] == [(P, "low", True)]


def test_measured_levels_read_every_stored_form():
    assert measured_levels({"pitch": "High", "rate": {"word": "slow"}, "energy": "low", "pitch_hz": 220.0,
                            "pauses": "some pauses", "intonation": "sideways"}) == \
        {P: "high", R: "slow", E: "soft", PA: "some pauses"}  # "low" energy is soft; unknown words are dropped
    assert level_of(E, "high") == "loud" and level_of(R, "quickly") == "fast" and level_of(P, "loud") is None


# -- one verdict: filter, reward, heuristic judge and metric run the same code -------------------------------------
def _expected(claims: set[str], measured: dict) -> tuple[int, int]:
    """(supported, contradicted) by the documented rule, from the table's expected claims."""
    supported = contradicted = 0
    for claim in claims:
        negated, (cue, level) = claim.startswith("!"), claim.lstrip("!").split("=")
        if negated:
            contradicted += level == measured[cue]
        elif level == measured[cue]:
            supported += 1
        else:
            contradicted += 1
    return supported, contradicted


@pytest.fixture(scope="module")
def stages():
    from emoreason.data.schema import EmotionRecord
    from emoreason.datagen.filters import FilterConfig, run_filters
    from emoreason.eval.metrics import load_metric
    from emoreason.train.judge import get_judge
    from emoreason.train.rewards import get_reward_funcs

    record = EmotionRecord(id="r", audio="r.wav", duration=2.0, corpus="table", label="happy")
    strict, lenient = get_reward_funcs(["cue_grounding"])[0], \
        get_reward_funcs(["cue_grounding"], {"cue_grounding": {"contradiction_penalty": 0.0}})[0]
    metric, judge = load_metric("reasoning_quality"), get_judge("cue_heuristic")
    cfg = FilterConfig(enabled=["format", "cue_contradiction"])

    def verdicts(sentence: str, measured: dict) -> dict:
        text = f"<think>\n{sentence}\n</think>\n<answer>happy</answer>"
        _, failure = run_filters(text, record, measured, cfg, set())
        kwargs = {"prompts": [None], "completions": [text], "cues": [json.dumps(measured)]}
        hard, soft = strict(**kwargs)[0], lenient(**kwargs)[0]
        quality = metric.compute(predictions=[text], references=["happy"], cues=[measured])
        return {
            "filter": failure is not None and failure[0] == "cue_contradiction",
            "reward": soft > hard,  # a penalty only changes the score when a claim is contradicted
            "judge_value": judge.score([sentence], [{"cues": measured}])[0],
            "metric": (quality["cue_hallucination_rate"] or 0.0) > 0,
            "metric_claims": quality["cue_claims"],
            "reward_value": hard,
        }

    return verdicts


@pytest.mark.parametrize("measured", list(MEASURED), ids=list(MEASURED))
@pytest.mark.parametrize("sentence,expected", TABLE, ids=[s for s, _ in TABLE])
def test_filter_reward_judge_and_metric_agree_on_each_row(stages, sentence, expected, measured):
    cues = MEASURED[measured]
    supported, contradicted = _expected(expected, cues)
    got = stages(sentence, cues)
    assert got["filter"] == got["reward"] == got["metric"] == (contradicted > 0), got
    assert got["metric_claims"] == supported + contradicted
    checked = supported + contradicted
    assert got["reward_value"] == pytest.approx((supported - contradicted) / checked if checked else 0.0)
    assert got["judge_value"] == pytest.approx(min(1.0, max(0.0, (supported - contradicted) / len(cues))))


def test_the_table_yields_both_verdicts():
    """Control: a parity test on rows that all pass (or all fail) could not tell the stages apart."""
    outcomes = {_expected(claims, cues)[1] > 0 for _, claims in TABLE for cues in MEASURED.values()}
    assert outcomes == {True, False}


# -- one vocabulary: what acoustic analysis writes, seeds describe and the prosody task asks ------------------------
def test_every_stage_uses_the_cue_level_words():
    from emoreason.data.conversation import INSTRUCTION_POOLS
    from emoreason.datagen.acoustic import INTONATIONS, LEVEL_WORDS
    from emoreason.datagen.seed import SeedDescription
    from emoreason.train.tasks import PROSODY_ATTRIBUTES

    for key, (_, words) in LEVEL_WORDS.items():
        assert tuple(words) == CUES[key].levels
    assert tuple(INTONATIONS) == CUES[I].levels
    described = SeedDescription(duration=1.0, transcript="hi", gender=None, cues=MEASURED["aroused"]).render()
    for key, level in MEASURED["aroused"].items():
        assert f"{CUES[key].label}: {level}" in described
    for attribute in PROSODY_ATTRIBUTES:
        cue = next(c for c in CUES.values() if c.name == attribute)
        for instruction in INSTRUCTION_POOLS[f"prosody.{attribute}"]:
            assert all(level in instruction.lower() for level in cue.levels), instruction
    # What each cue's words map to is one of its level words, and every level can be said.
    for cue in CUES.values():
        assert set(cue.words.values()) == set(cue.levels), cue.key
        assert all(cue.opposite.get(level, level) in cue.levels for level in cue.levels)


def test_data_imports_no_other_stage():
    code = ("import sys, emoreason.data.cues, emoreason.data.judging; print(sorted(m for m in sys.modules "
            "if m.startswith('emoreason.') and not m.startswith('emoreason.data')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_the_template_teacher_says_what_the_reader_reads():
    """Each cue sentence the template teacher writes, at each level, is read back as exactly that claim."""
    from emoreason.datagen.teachers import CUE_PHRASES, PROFILES

    for key, phrases in CUE_PHRASES.items():
        for phrase in phrases:
            for level in CUES[key].levels:
                assert [c.key for c in extract_claims(phrase.format(v=level))] == [(key, level, False)], phrase
    assert all(level in CUES[key].levels for profile in PROFILES.values() for key, levels in profile.items()
               for level in levels)


# -- bad input: never raises, stays linear --------------------------------------------------------------------------
WORDS = st.sampled_from(["not", "no", "never", "only", "pitch", "volume", "high", "loud", "speaks", "fast", "and",
                         "nor", "neither", "rather", "than", "about", "'", '"', "?", ",", ".", "sad", "other", "can't",
                         "miss", "such", "heard", "less", "far", "from", "voice", "range", "-", "\u2019", "\n"])


@settings(max_examples=300, deadline=None)
@given(text=st.lists(st.one_of(WORDS, st.text(max_size=12)), max_size=60).map(" ".join))
def test_any_text_is_read_without_raising(text):
    claims = extract_claims(text)
    assert all(c.cue in CUES and c.level in CUES[c.cue].levels for c in claims)
    assert len({c.key for c in claims}) == len(claims)
    stated_emotions(text), argued_emotion(text), ground(text, MEASURED["aroused"])


@pytest.mark.parametrize("unit", ["pitch high ", "she speaks fast ", "not only no ", "neither pitch nor volume or "])
def test_a_long_run_on_text_is_read_in_linear_time(unit):
    import time

    started = time.perf_counter()
    extract_claims(unit * 20_000)  # ~300 KB, no clause break: 41 s ("pitch high") with the reader before issue 25
    assert time.perf_counter() - started < 20


@pytest.mark.parametrize("text,stated,argued", [
    ("She sounds sad, not angry.", [("sad", False), ("angry", True)], "sad"),
    ("It is anger rather than sadness.", [("angry", False), ("sad", True)], "angry"),
    ("Is she angry? The voice is soft and slow, so sad.", [("sad", False)], "sad"),
    ('She says "I am so happy" but sounds sad.', [("sad", False)], "sad"),
    ("The other cues are unremarkable.", [], None),
    ("Not happy at all.", [("happy", True)], None),
])
def test_emotions_are_read_like_cue_claims(text, stated, argued):
    assert stated_emotions(text) == stated and argued_emotion(text) == argued
