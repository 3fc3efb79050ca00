"""The acoustic cues: their keys, their level words, and the one reader of cue claims in free text.

Every stage that writes or checks a statement about the voice goes through this module: the acoustic analysis
writes :attr:`Cue.levels` words into ``record.cues``, seed descriptions label them with :attr:`Cue.label`, the
prosody SFT task asks for them, and the datagen filter, the GRPO ``cue_grounding`` reward, the heuristic judge and
the evaluator's reasoning metric all read rationales with :func:`extract_claims` and check them with
:func:`ground`. So a filter, a reward and a metric cannot disagree about what a sentence claims.

How a sentence is read (the choices are deliberate; ``tests/test_cues.py`` holds the table they must satisfy):

* Text is cut into clauses at punctuation and at joining words (and, but, while, with, ...). A level word is a claim
  about a cue only inside a clause that names that cue ("the *pitch* is high", "high *energy*"), or when the word
  names its cue by itself ("loud", "softly", "monotone", "fluent"). When a level word fits several named cues
  ("high" with pitch and volume), the nearest anchor wins. Compound names are read first: "pitch range" and "pitch
  variation" talk about variation, "pitch contour" about intonation, never about the pitch level.
* A short clause with no cue name ("..., not low") continues the cue of the clause before it.
* Negation ("not high", "isn't particularly loud", "neither high nor low", "high rather than low") gives a
  **negated claim** (``negated=True``). A negated claim is contradicted when the measured level is the negated one,
  and otherwise supports nothing: "the pitch is not low" cannot earn credit for a high pitch (that would pay for
  listing every wrong level), but "not high" about a high pitch is an error. "No pauses" / "without pausing" is a
  positive claim (``pauses: fluent``).
* Hedges ("slightly", "somewhat", "seems", "maybe") keep the claim and set ``hedged=True``; nobody downstream
  weighs them differently today.
* A claim repeated in the same text counts once (repeating "the pitch is high" earns nothing more).
* Emotion words ("sad, not angry"), the word "other" and words about the transcript are not cue claims.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Cue:
    key: str  # the key in ``record.cues``
    name: str  # short attribute name (the prosody task's attribute; an accepted alias key in cues dicts)
    label: str  # how a seed description names it
    noun: str  # how prose names it ("volume", "speaking rate")
    levels: tuple[str, ...]  # the words acoustic analysis writes; graded cues are ordered low -> high
    words: Mapping[str, str]  # surface word in free text -> level
    anchors: tuple[str, ...]  # words that say a clause talks about this cue
    self_anchoring: tuple[str, ...] = ()  # level words that name the cue by themselves ("loudly")
    # A contradicting level per level: the flip that builds hallucinated-cue DPO pairs. Cues without one are never
    # flipped (the teachers do not always state them, so a flipped one would rarely yield a usable negative).
    opposite: Mapping[str, str] = field(default_factory=dict)


def _words(levels: Mapping[str, Iterable[str]]) -> dict[str, str]:
    return {word: level for level, words in levels.items() for word in words}


_NORMAL = ("normal", "moderate", "average", "medium")

CUES: dict[str, Cue] = {cue.key: cue for cue in (
    Cue("pitch_level", "pitch", "Pitch", "pitch", ("low", "normal", "high"),
        _words({"low": ("low", "lower", "lowered", "deep", "deeper"),
                "high": ("high", "higher", "raised", "elevated", "shrill"),
                "normal": (*_NORMAL, "mid", "mid-range")}),
        anchors=("pitch", "pitched", "f0", "frequency", "register"),
        opposite={"low": "high", "normal": "high", "high": "low"}),
    Cue("pitch_variation", "variation", "Pitch variation", "pitch variation", ("monotone", "normal", "expressive"),
        _words({"monotone": ("monotone", "monotonous", "narrow", "limited", "restricted", "little", "low", "small"),
                "expressive": ("expressive", "wide", "broad", "lively", "animated", "large", "high", "varied"),
                "normal": _NORMAL}),
        anchors=("range", "variation", "variability", "modulation", "excursion", "excursions", "varies"),
        self_anchoring=("monotone", "monotonous")),
    Cue("energy_level", "energy", "Volume", "volume", ("soft", "normal", "loud"),
        _words({"soft": ("soft", "softer", "softly", "quiet", "quieter", "quietly", "low", "lower", "weak", "faint",
                         "hushed"),
                "loud": ("loud", "louder", "loudly", "strong", "high", "higher", "raised", "forceful"),
                "normal": _NORMAL}),
        anchors=("volume", "loudness", "energy", "intensity", "amplitude"),
        self_anchoring=("soft", "softer", "softly", "quiet", "quieter", "quietly", "hushed", "loud", "louder",
                        "loudly"),
        opposite={"soft": "loud", "normal": "soft", "loud": "soft"}),
    Cue("rate_level", "rate", "Speaking rate", "speaking rate", ("slow", "normal", "fast"),
        _words({"slow": ("slow", "slower", "slowly", "sluggish", "unhurried", "leisurely", "drawn-out"),
                "fast": ("fast", "faster", "quick", "quicker", "quickly", "rapid", "rapidly", "hurried", "hurriedly",
                         "rushed"),
                "normal": (*_NORMAL, "steady")}),
        anchors=("rate", "pace", "paced", "tempo", "speed", "delivery", "speech", "speak", "speaks", "spoke",
                 "speaking", "talk", "talks", "talked", "talking"),
        opposite={"slow": "fast", "normal": "slow", "fast": "slow"}),
    Cue("intonation", "intonation", "Intonation", "intonation", ("rising", "falling", "rise-fall", "fall-rise", "flat"),
        _words({"rising": ("rising", "rises", "rise", "upward"),
                "falling": ("falling", "falls", "fall", "downward", "dropping", "drops"),
                "rise-fall": ("rise-fall",), "fall-rise": ("fall-rise",), "flat": ("flat",)}),
        anchors=("intonation", "contour", "melody", "inflection", "pitch"),
        opposite={"rising": "falling", "falling": "rising", "rise-fall": "flat", "fall-rise": "flat",
                  "flat": "rising"}),
    Cue("pauses", "pauses", "Pauses", "pauses", ("fluent", "some pauses", "long pauses"),
        _words({"fluent": ("fluent", "fluently", "fluid", "smooth", "smoothly", "uninterrupted"),
                "some pauses": ("some", "few", "occasional", "brief", "short"),
                "long pauses": ("long", "lengthy", "many", "frequent", "hesitant", "halting")}),
        anchors=("pause", "pauses", "pausing", "paused", "hesitation", "hesitations", "silences"),
        self_anchoring=("fluent", "fluently", "hesitant", "halting")),
)}
CUE_KEYS: tuple[str, ...] = tuple(CUES)
PROSODY_CUES: tuple[str, ...] = ("pitch_level", "energy_level", "rate_level")  # graded low/normal/high cues

# Two-word names read before single words: the pitch inside "pitch range" is not the pitch level.
_COMPOUNDS: dict[tuple[str, str], str] = {
    ("pitch", "range"): "pitch_variation", ("pitch", "variation"): "pitch_variation",
    ("pitch", "variability"): "pitch_variation", ("pitch", "modulation"): "pitch_variation",
    ("pitch", "excursion"): "pitch_variation", ("pitch", "excursions"): "pitch_variation",
    ("pitch", "contour"): "intonation", ("pitch", "movement"): "intonation",
    ("fundamental", "frequency"): "pitch_level", ("speaking", "rate"): "rate_level",
    ("speech", "rate"): "rate_level",
}
_NEGATORS = {"not", "no", "never", "neither", "nor", "without", "hardly", "barely", "cannot", "lacks", "lacking"}
_NEGATING_PHRASES = (("rather", "than"), ("instead", "of"), ("free", "of"))
_HEDGES = {"slightly", "somewhat", "fairly", "relatively", "maybe", "perhaps", "possibly", "probably",
           "likely", "seems", "seem", "seemed", "appears", "appear", "might", "may", "could", "arguably", "bit",
           "little", "kind", "sort", "mildly", "moderately"}
_NEGATION_WINDOW = 4  # tokens before a level word that a negator reaches ("is not particularly very high")
_CONTINUATION_TOKENS = 4  # a clause this short without a cue name continues the previous clause's cue
_CLAUSE_SPLIT = re.compile(r"[.;:!?\n,()\[\]\u2014\u2013]|\s-\s|\b(?:and|but|while|whereas|although|though|yet|with|"
                           r"because|plus)\b", re.I)
_TOKEN = re.compile(r"[a-z0-9]+(?:['\u2019-][a-z0-9]+)*")
_KNOWN_WORDS = {w for cue in CUES.values() for w in (*cue.words, *cue.anchors)}


@dataclass(frozen=True)
class Claim:
    """One statement about a cue: ``level`` of ``cue`` (a key of :data:`CUES`), possibly negated or hedged."""

    cue: str
    level: str
    negated: bool = False
    hedged: bool = False
    clause: str = field(default="", compare=False)

    @property
    def key(self) -> tuple[str, str, bool]:
        return self.cue, self.level, self.negated


@dataclass
class Grounding:
    """Claims of a text checked against measured levels."""

    supported: list[Claim] = field(default_factory=list)  # positive claims that match the measurement
    contradicted: list[Claim] = field(default_factory=list)  # positive claims that differ; negations of the truth
    unchecked: list[Claim] = field(default_factory=list)  # cue not measured, or a negation consistent with it

    @property
    def checked(self) -> int:
        return len(self.supported) + len(self.contradicted)

    def describe_contradictions(self, measured: Mapping[str, str]) -> list[str]:
        return [f"{c.cue}: says {'not ' if c.negated else ''}{c.level}, measured {measured[c.cue]} ({c.clause!r})"
                for c in self.contradicted]


def _tokens(clause: str) -> list[str]:
    out = []
    for token in _TOKEN.findall(clause.lower().replace("\u2019", "'")):
        if token.endswith("n't"):
            out.extend([token[:-3], "not"])
        elif "-" in token and token not in _KNOWN_WORDS:
            out.extend(part for part in token.split("-") if part)
        else:
            out.append(token)
    return out


def _anchors(tokens: list[str]) -> dict[str, list[int]]:
    """cue -> token positions naming it (compounds first; their tokens are used up)."""
    found: dict[str, list[int]] = {}
    used: set[int] = set()
    for i in range(len(tokens) - 1):
        cue = _COMPOUNDS.get((tokens[i], tokens[i + 1]))
        if cue and i not in used:
            found.setdefault(cue, []).append(i + 1)
            used.update((i, i + 1))
    for i, token in enumerate(tokens):
        if i in used:
            continue
        for cue in CUES.values():
            if token in cue.anchors:
                found.setdefault(cue.key, []).append(i)
    return found


def _negated(tokens: list[str], i: int) -> bool:
    before = tokens[max(0, i - _NEGATION_WINDOW): i]
    if any(t in _NEGATORS for t in before):
        return True
    pairs = list(zip(before, before[1:]))
    return any(p in pairs for p in _NEGATING_PHRASES)


def extract_claims(text: str | None) -> list[Claim]:
    """Every claim ``text`` makes about a cue, in order, each (cue, level, negated) once. See the module doc."""
    claims: list[Claim] = []
    seen: set[tuple[str, str, bool]] = set()
    previous: dict[str, list[int]] = {}
    for clause in _CLAUSE_SPLIT.split(text or ""):
        if not clause or not clause.strip():
            continue
        tokens = _tokens(clause)
        anchors = _anchors(tokens)
        inherited = not anchors and len(tokens) <= _CONTINUATION_TOKENS
        if inherited:
            anchors = {cue: [-_CONTINUATION_TOKENS - 1] for cue in previous}  # far before the clause: weakest
        found_level = False
        for i, token in enumerate(tokens):
            best: tuple[int, str] | None = None
            for cue in CUES.values():
                if token not in cue.words:
                    continue
                if token in cue.self_anchoring:
                    distance = 0
                elif cue.key in anchors:
                    distance = min(abs(i - j) for j in anchors[cue.key])
                else:
                    continue
                if best is None or distance < best[0]:
                    best = (distance, cue.key)
            if best is None:
                continue
            found_level = True
            cue = best[1]
            claim = Claim(cue, CUES[cue].words[token], _negated(tokens, i),
                          any(t in _HEDGES for t in tokens[:i]), clause.strip())
            if claim.key not in seen:
                seen.add(claim.key)
                claims.append(claim)
        # "no pauses", "without pausing": a fluent delivery, said through negation.
        if "pauses" in anchors and not found_level and any(_negated(tokens, j) for j in anchors["pauses"]):
            claim = Claim("pauses", "fluent", False, False, clause.strip())
            if claim.key not in seen:
                seen.add(claim.key)
                claims.append(claim)
        if not inherited:
            previous = anchors
    return claims


def level_of(cue: str, word: Any) -> str | None:
    """A measured or stated value for ``cue`` as its level word (``"high"`` energy -> ``"loud"``), else None."""
    if isinstance(word, Mapping):
        word = word.get("word") or word.get("level")
    if not isinstance(word, str) or not word.strip():
        return None
    word = word.strip().lower()
    spec = CUES[cue]
    if word in spec.levels:
        return word
    return spec.words.get(word)


def measured_value(cues: Mapping[str, Any] | None, cue: str) -> Any:
    """The raw value a cues dict holds for ``cue``: under its key (``pitch_level``), its short name (``pitch``) or
    ``<name>_word``; a ``{"word": ...}`` / ``{"level": ...}`` object gives its word."""
    spec = CUES[cue]
    for key in (spec.key, spec.name, f"{spec.name}_word", f"{spec.name}_level"):
        value = (cues or {}).get(key)
        if isinstance(value, Mapping):
            value = value.get("word") or value.get("level")
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def measured_levels(cues: Mapping[str, Any] | None) -> dict[str, str]:
    """cue key -> level word for every cue of a record's ``cues`` that holds a known level."""
    out = {}
    for cue in CUES:
        level = level_of(cue, measured_value(cues, cue))
        if level is not None:
            out[cue] = level
    return out


def ground(text_or_claims: str | Iterable[Claim] | None, cues: Mapping[str, Any] | None) -> Grounding:
    """Check the claims of a text (or already extracted claims) against the measured cues."""
    claims = extract_claims(text_or_claims) if text_or_claims is None or isinstance(text_or_claims, str) \
        else list(text_or_claims)
    measured = measured_levels(cues)
    result = Grounding()
    for claim in claims:
        truth = measured.get(claim.cue)
        if truth is None:
            result.unchecked.append(claim)
        elif claim.negated:
            (result.contradicted if claim.level == truth else result.unchecked).append(claim)
        else:
            (result.supported if claim.level == truth else result.contradicted).append(claim)
    return result


def contradictions(text: str | None, cues: Mapping[str, Any] | None) -> list[str]:
    """Human-readable claims in ``text`` that the measured cues contradict (empty when none)."""
    return ground(text, cues).describe_contradictions(measured_levels(cues))
