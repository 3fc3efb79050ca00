"""The acoustic cues: their keys, their level words, and the one reader of cue claims in free text.

Every stage that writes or checks a statement about the voice goes through this module: the acoustic analysis
writes :attr:`Cue.levels` words into ``record.cues``, seed descriptions label them with :attr:`Cue.label`, the
prosody SFT task asks for them, and the datagen filter, the GRPO ``cue_grounding`` reward, the heuristic judge and
the evaluator's reasoning metric all read rationales with :func:`extract_claims` and check them with
:func:`ground`. So a filter, a reward and a metric cannot disagree about what a sentence claims.

How a sentence is read (the choices are deliberate; ``tests/test_cues.py`` holds the table they must satisfy, phrased
the way LLM teachers write):

* What is not a statement about the clip is skipped: quoted spans (the transcript's words), questions ("Is the
  volume loud? No, it is soft." claims soft only; the cue a question names is what its answer talks about), and
  what follows a word about the content ("she speaks *about* a fast car", "the *transcript* mentions ...").
* Text is cut into clauses at punctuation and at joining words (and, but, while, with, ...); an "and" between two
  cue names does not cut ("the pitch and the volume are high" claims both). A level word is a claim about a cue only
  inside a clause that names that cue ("the *pitch* is high", "high *energy*"), or when the word names its cue by
  itself ("loud", "softly", "monotone", "fluent"). When a level word fits several named cues ("high" with pitch and
  volume), the nearest name wins, and names joined by and / or / nor share it ("neither the pitch nor the volume
  is high" denies both). Compound names are read first: "pitch range" and "pitch variation" talk about variation,
  "pitch contour" about intonation, never about the pitch level.
* Some names need a prosodic noun beside them: "intensity", "range" and "frequency" name a cue only with "voice",
  "vocal", "pitch"... in the clause ("the emotional intensity", "a wide range of emotions", "the frequency of her
  pauses" claim nothing). Speaking verbs ("speaks", "talk", "speech") name the rate only for a level word tied to
  them ("speaks quickly", "slow speech", "her speech is very fast"). "The voice" names no cue, but a level word that
  only one of pitch, volume and rate uses is about that cue ("a deep voice", "the voice is ... fast").
* A name excluded by a contrast is not the subject: "the volume, rather than the pitch, is high" (and "not the
  pitch", "instead of the pitch") is about the volume.
* A short clause with no cue name ("..., not low") continues the cue of the clause before it.
* Negation ("not", "no", "never", "nothing", "none", "without", "hardly", "barely", "less", "lacks", "neither ... nor",
  "far from", "rather than", "instead of") covers what follows it up to the end of its clause or a contrast word
  (but, yet, though, ...), and gives a **negated claim** (``negated=True``). Emphatic phrasing is not a denial: "not
  only loud", "never heard such a loud voice", "couldn't be higher", "can't miss the high pitch", "no doubt",
  "without a doubt", "more or less". A negated claim is contradicted when the measured level is the negated one, and
  otherwise supports nothing: "the pitch is not low" cannot earn credit for a high pitch (that would pay for listing
  every wrong level), but "not high" about a high pitch is an error. "No pauses" / "without pausing" is a positive
  claim (``pauses: fluent``).
* Hedges ("slightly", "somewhat", "seems", "maybe") keep the claim and set ``hedged=True``; nobody downstream
  weighs them differently today.
* A claim repeated in the same text counts once (repeating "the pitch is high" earns nothing more).
* Emotion words ("sad, not angry"), the word "other" and words about the transcript are not cue claims. The emotions
  a rationale states are read by :func:`stated_emotions`, with the same clauses, quoting, questions and negation.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .labels import LabelError, normalize_emotion


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
        anchors=("pitch", "pitched", "f0", "register"),
        opposite={"low": "high", "normal": "high", "high": "low"}),
    Cue("pitch_variation", "variation", "Pitch variation", "pitch variation", ("monotone", "normal", "expressive"),
        _words({"monotone": ("monotone", "monotonous", "narrow", "limited", "restricted", "little", "low", "small"),
                "expressive": ("expressive", "wide", "broad", "lively", "animated", "large", "high", "varied"),
                "normal": _NORMAL}),
        anchors=("variation", "variability", "modulation", "excursion", "excursions", "varies"),
        self_anchoring=("monotone", "monotonous")),
    Cue("energy_level", "energy", "Volume", "volume", ("soft", "normal", "loud"),
        _words({"soft": ("soft", "softer", "softly", "quiet", "quieter", "quietly", "low", "lower", "weak", "faint",
                         "hushed"),
                "loud": ("loud", "louder", "loudly", "strong", "high", "higher", "raised", "forceful"),
                "normal": _NORMAL}),
        anchors=("volume", "loudness", "energy", "amplitude"),
        self_anchoring=("soft", "softer", "softly", "quiet", "quieter", "quietly", "hushed", "loud", "louder",
                        "loudly"),
        opposite={"soft": "loud", "normal": "soft", "loud": "soft"}),
    Cue("rate_level", "rate", "Speaking rate", "speaking rate", ("slow", "normal", "fast"),
        _words({"slow": ("slow", "slower", "slowly", "sluggish", "unhurried", "leisurely", "drawn-out"),
                "fast": ("fast", "faster", "quick", "quicker", "quickly", "rapid", "rapidly", "hurried", "hurriedly",
                         "rushed"),
                "normal": (*_NORMAL, "steady")}),
        anchors=("rate", "pace", "paced", "tempo", "speed", "delivery"),
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
# Nouns that name a cue only beside a prosodic noun: "the intensity of her voice", "vocal range", but not "the
# emotional intensity", "a wide range of emotions" or "the frequency of her pauses".
_WEAK_NOUNS = {"intensity": "energy_level", "range": "pitch_variation", "frequency": "pitch_level"}
_PROSODIC_NOUNS = {"voice", "voices", "vocal", "vocally", "prosody", "prosodic", "acoustic", "acoustically", "pitch",
                   "f0"}
# Speaking verbs name the rate only for a level word tied to them ("speaks quickly", "slow speech", "her speech is
# fast"), never across other words ("she speaks about a fast car").
_SPEAKING = {"speak", "speaks", "spoke", "spoken", "speaking", "speech", "talk", "talks", "talked", "talking"}
_GLUE = {"is", "was", "are", "were", "be", "been", "being", "sounds", "sound", "seems", "seem", "very", "quite",
         "rather", "really", "extremely", "too", "so", "a", "an", "the", "bit", "little", "somewhat", "slightly",
         "fairly", "relatively", "pretty", "not", "no", "never", "her", "his", "their", "its", "overall", "more",
         "much", "notably", "noticeably", "unusually", "particularly", "remarkably", "rather", "instead", "any", "even",
         "less"}
# "The voice" names no cue, but a level word that only one prosodic cue uses is about that cue: "a deep voice",
# "the voice is not only loud but also fast".
_VOICE = {"voice", "voices"}
_DETERMINERS = {"the", "a", "an", "her", "his", "its", "their", "our", "my", "your", "this", "that", "both", "either",
                "neither", "speaker's", "speakers"}
_NEGATORS = {"not", "no", "never", "neither", "nor", "without", "hardly", "barely", "scarcely", "cannot", "lacks",
             "lacking", "lack", "nothing", "none", "less", "absent"}
_NEGATING_PHRASES = (("rather", "than"), ("instead", "of"), ("free", "of"), ("far", "from"))
# Negators that do not deny: "not only", "can't miss", "no doubt", "without question", "never heard such".
_NOT_DENIALS = {"only", "just", "merely", "simply"}
_DENIED_DENIALS = {"miss", "missed", "missing", "ignore", "ignoring", "overlook", "overlooking", "deny", "denying",
                   "denied", "doubt", "doubting", "question", "mistake", "mistaking", "mistaken"}
_PERCEIVING = {"heard", "hear", "seen", "see", "met", "encountered", "known", "noticed"}
_MODALS = {"could", "can", "would"}
_CONTRASTS = {"but", "yet", "however", "though", "although", "whereas", "while", "except", "apart", "besides"}
# Negators that head a noun phrase: their scope ends with the first cue name it reaches ("without hesitation at a fast
# pace" denies the hesitation, not the pace), unless "or" / "nor" carries it on.
_PHRASE_NEGATORS = {"no", "without", "lacks", "lacking", "lack", "absent", "of"}
_HEDGES = {"slightly", "somewhat", "fairly", "relatively", "maybe", "perhaps", "possibly", "probably",
           "likely", "seems", "seem", "seemed", "appears", "appear", "might", "may", "could", "arguably", "bit",
           "little", "kind", "sort", "mildly", "moderately"}
# After these words a clause talks about what is said, not about the voice ("she speaks about a fast car").
_CONTENT = {"about", "regarding", "concerning", "mentions", "mention", "mentioned", "mentioning", "transcript",
            "says", "said", "saying", "describes", "describing", "word", "words", "phrase", "wording", "lyrics"}
# Manner adverbs stay claims after a content word: "she says it loudly", "she talks about it quickly".
_MANNER = {w for cue in CUES.values() for w in cue.words if w.endswith("ly") and w != "lively"}
_MAX_GLUE_TOKENS = 6  # the most words between a speaking verb and its level word ("speaks not very quickly")
_MAX_CLAUSE_TOKENS = 80  # longer clauses (none in real rationales) are cut into pieces of this many tokens
_CONTINUATION_TOKENS = 4  # a clause this short without a cue name continues the previous clause's cue
_JOINERS = {"and", "but", "while", "whereas", "although", "though", "yet", "with", "because", "plus", "however"}
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]*")
_CLAUSE_BREAK = re.compile(r"[;:,()\[\]\u2014\u2013]|\s-\s")
_QUOTED = re.compile(r'"[^"\n]*"|\u201c[^\u201d\n]*\u201d|\u2018[^\u2019\n]*\u2019|(?<!\w)\'[^\'\n]*\'(?!\w)')
_TOKEN = re.compile(r"[a-z0-9]+(?:['\u2019-][a-z0-9]+)*")
_KNOWN_WORDS = {w for cue in CUES.values() for w in (*cue.words, *cue.anchors)}
_NAMES = {w for cue in CUES.values() for w in cue.anchors} | set(_WEAK_NOUNS) | {b for _, b in _COMPOUNDS}
# Level words only one graded cue uses (not its normal level): what "the voice" plus the word can claim.
_VOICE_WORDS = {word: key for key in PROSODY_CUES for word, level in CUES[key].words.items()
                if level != "normal" and sum(word in CUES[k].words for k in PROSODY_CUES) == 1}
_COMPARATIVES = {w for cue in CUES.values() for w in cue.words if w.endswith("er")}


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
            stem = token[:-3]
            out.extend([{"ca": "can", "wo": "will", "sha": "shall"}.get(stem, stem), "not"])
        elif "-" in token and token not in _KNOWN_WORDS:
            out.extend(part for part in token.split("-") if part)
        else:
            out.append(token)
    return out


def clauses(text: str | None) -> list[tuple[list[str], bool]]:
    """``text`` as clauses of tokens, in order, each with whether it sits in a question. Quoted spans (transcript
    words) are left out. Clauses end at punctuation and at joining words (and, but, while, with, ...), except an
    "and" between two cue names ("the pitch and the volume are high" is one clause). A question states nothing, but
    the cue it names is what its answer talks about ("Is the intonation rising? It is falling.")."""
    out: list[tuple[list[str], bool]] = []
    text = _QUOTED.sub(" , ", text or "")
    for sentence in _SENTENCE.findall(text):
        question = "?" in sentence.rstrip()[-3:]
        for piece in _CLAUSE_BREAK.split(sentence):
            tokens = _tokens(piece)
            current: list[str] = []
            for i, token in enumerate(tokens):
                if token in _JOINERS and not (token == "and" and _joins_names(tokens, i)):
                    out.append((current, question))
                    current = []
                else:
                    current.append(token)
            out.append((current, question))
    # A run-on clause is read in pieces, so that reading stays linear in the text's length whatever it holds.
    return [(tokens[k: k + _MAX_CLAUSE_TOKENS], question) for tokens, question in out
            for k in range(0, len(tokens), _MAX_CLAUSE_TOKENS)]


def _approximately(tokens: list[str], i: int) -> bool:
    """Whether the "about" at ``i`` means roughly ("about normal", "about 200 Hz"), not the topic."""
    following = tokens[i + 1: i + 2]
    return tokens[i] == "about" and bool(following) and (following[0] in _KNOWN_WORDS or following[0][0].isdigit())


def _joins_names(tokens: list[str], i: int) -> bool:
    """Whether the "and" at ``i`` joins two cue names ("pitch and (the) volume")."""
    j = i + 1
    while j < len(tokens) and tokens[j] in _DETERMINERS:
        j += 1
    return i > 0 and j < len(tokens) and tokens[i - 1] in _NAMES and tokens[j] in _NAMES


def _negation_scope(tokens: list[str], excluded: set[int], names: set[int] = frozenset()) -> list[bool]:
    """Per token: whether a negation covers it. A negation covers what follows it up to the end of the clause or a
    contrast word; an excluded cue name ("not the pitch") closes it, and so does the first cue name after a negator
    that heads a noun phrase ("no", "without", "free of"). Negators that do not deny open nothing: "not only", "can't
    miss", "no doubt", "never heard such", "couldn't be higher", "more or less"."""
    scope, active, phrase = [False] * len(tokens), False, False
    for i, token in enumerate(tokens):
        if token in _CONTRASTS:
            active = False
        opens = token in _NEGATORS or (i > 0 and (tokens[i - 1], token) in _NEGATING_PHRASES)
        if opens and not _not_a_denial(tokens, i):
            active, phrase = True, token in _PHRASE_NEGATORS
        scope[i] = active
        if i in excluded or (phrase and i in names and tokens[i + 1: i + 2] not in (["or"], ["nor"])):
            active = phrase = False
    return scope


def _not_a_denial(tokens: list[str], i: int) -> bool:
    token, after = tokens[i], tokens[i + 1: i + 4]
    if token == "less" and tokens[max(0, i - 2):i] == ["more", "or"]:
        return True
    if after[:1] and after[0] in _NOT_DENIALS:
        return True
    if any(t in _DENIED_DENIALS for t in after[:3]):
        return True
    rest = tokens[i + 1:]  # a clause has at most _MAX_CLAUSE_TOKENS
    perceived = next((k for k, t in enumerate(rest[:4]) if t in _PERCEIVING), None)
    if perceived is not None and any(t in ("such", "so") for t in rest[perceived:]):
        return True
    if i > 0 and tokens[i - 1] in _MODALS:  # "couldn't be higher", "can't get any louder"
        for t in rest[:4]:
            if t in _COMPARATIVES:
                return True
            if t not in ("be", "get", "sound", "any", "much", "possibly", "have", "been", *_SPEAKING):
                break
    return False


def _anchors(tokens: list[str]) -> tuple[dict[str, list[int]], set[int]]:
    """cue -> token positions naming it (compounds first; their tokens are used up; weak nouns only beside a
    prosodic noun), and the positions of names excluded by a contrast ("the volume, rather than the pitch, ...")."""
    found: dict[str, list[int]] = {}
    used: set[int] = set()
    for i in range(len(tokens) - 1):
        cue = _COMPOUNDS.get((tokens[i], tokens[i + 1]))
        if cue and i not in used:
            found.setdefault(cue, []).append(i + 1)
            used.update((i, i + 1))
    prosodic = any(t in _PROSODIC_NOUNS for t in tokens)
    for i, token in enumerate(tokens):
        if i in used:
            continue
        for cue in CUES.values():
            if token in cue.anchors:
                found.setdefault(cue.key, []).append(i)
        if prosodic and _WEAK_NOUNS.get(token):
            found.setdefault(_WEAK_NOUNS[token], []).append(i)
    excluded = set()
    for positions in found.values():
        for j in positions:
            k = j - 1
            while k >= 0 and tokens[k] in _DETERMINERS:
                k -= 1
            if k >= 0 and (tokens[k] == "not" or (k > 0 and (tokens[k - 1], tokens[k]) in _NEGATING_PHRASES[:2])):
                excluded.add(j)
    found = {cue: kept for cue, positions in found.items() if (kept := [j for j in positions if j not in excluded])}
    return found, excluded


def _groups(tokens: list[str], anchors: dict[str, list[int]]) -> dict[int, set[int]]:
    """Cue names joined by and / or / nor (determiners between): each name's group ("neither the pitch nor the
    volume")."""
    positions = sorted(j for js in anchors.values() for j in js)
    groups = {j: {j} for j in positions}
    for a, b in zip(positions, positions[1:]):
        between = tokens[a + 1: b]
        if between and between[0] in ("and", "or", "nor") and all(t in _DETERMINERS for t in between[1:]):
            merged = groups[a] | groups[b]
            for j in merged:
                groups[j] = merged
    return groups


def _tied_to_speaking(tokens: list[str], i: int, speaking: list[int]) -> int | None:
    """The distance from a level word to a speaking verb it is tied to by glue words only, else None."""
    best = None
    for j in speaking:
        lo, hi = sorted((i, j))
        if hi - lo > _MAX_GLUE_TOKENS:
            continue
        between = [t for k, t in enumerate(tokens[lo + 1: hi], lo + 1) if (tokens[k - 1], t) not in _NEGATING_PHRASES]
        if all(t in _GLUE or t in CUES["rate_level"].words for t in between) and (best is None or hi - lo < best):
            best = hi - lo
    return best


def extract_claims(text: str | None) -> list[Claim]:
    """Every claim ``text`` makes about a cue, in order, each (cue, level, negated) once. See the module doc."""
    claims: list[Claim] = []
    seen: set[tuple[str, str, bool]] = set()

    def add(claim: Claim) -> None:
        if claim.key not in seen:
            seen.add(claim.key)
            claims.append(claim)

    previous: dict[str, list[int]] = {}
    for tokens, question in clauses(text):
        clause = " ".join(tokens)
        anchors, excluded = _anchors(tokens)
        speaking = [i for i, t in enumerate(tokens) if t in _SPEAKING]
        voice = [i for i, t in enumerate(tokens) if t in _VOICE]
        names_other = any(t in _WEAK_NOUNS or t in _CONTENT for t in tokens) or excluded
        inherited = not anchors and not speaking and not voice and not names_other \
            and len(tokens) <= _CONTINUATION_TOKENS
        if inherited:
            far = -_CONTINUATION_TOKENS - 1  # far before the clause: the weakest anchor
            anchors = {cue: [far] for cue in previous if cue not in ("<speaking>", "<voice>")}
            speaking = [far] if "<speaking>" in previous else []
            voice = [far] if "<voice>" in previous else []
        negation = _negation_scope(tokens, excluded, {j for js in anchors.values() for j in js if j >= 0})
        groups = _groups(tokens, anchors)
        content_from = next((i for i, t in enumerate(tokens) if t in _CONTENT and not _approximately(tokens, i)),
                            len(tokens))
        stated_pauses = False  # a pause level word was read in this clause
        for i, token in enumerate(tokens):
            if question:  # asks, claims nothing ("Is the volume loud? No, it is soft.")
                break
            if i >= content_from and token not in _MANNER:  # "she says it loudly" is the voice; "a fast car" is not
                continue
            best: tuple[int, str, int | None] | None = None
            for cue in CUES.values():
                if token not in cue.words:
                    continue
                anchor = None
                if token in cue.self_anchoring:
                    distance = 0
                elif cue.key in anchors:
                    anchor = min(anchors[cue.key], key=lambda j: abs(i - j))
                    distance = abs(i - anchor)
                elif cue.key == "rate_level" and (tied := _tied_to_speaking(tokens, i, speaking)) is not None:
                    distance = tied
                elif voice and _VOICE_WORDS.get(token) == cue.key:
                    distance = len(tokens) + _CONTINUATION_TOKENS + 2  # weaker than any cue name
                else:
                    continue
                if best is None or distance < best[0]:
                    best = (distance, cue.key, anchor)
            if best is None:
                continue
            stated_pauses = stated_pauses or best[1] == "pauses"
            hedged = any(t in _HEDGES for t in tokens[:i])
            add(Claim(best[1], CUES[best[1]].words[token], negation[i], hedged, clause))
            for j in sorted(groups.get(best[2], ())):  # the same level of every cue named with it
                other = next(key for key, js in anchors.items() if j in js)
                if other != best[1] and token in CUES[other].words:
                    add(Claim(other, CUES[other].words[token], negation[i], hedged, clause))
        # "no pauses", "without pausing": a fluent delivery, said through negation.
        if "pauses" in anchors and not stated_pauses and not question \
                and any(negation[j] for j in anchors["pauses"] if j >= 0):
            add(Claim("pauses", "fluent", False, False, clause))
        if not inherited and (anchors or not excluded):  # "..., rather than the pitch, is high": keep the volume
            previous = dict(anchors)
            if speaking:
                previous["<speaking>"] = speaking
            if voice:
                previous["<voice>"] = voice
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


# -- the emotions a rationale states (read like cue claims: same clauses, quoting, questions and negation) -----------
@functools.lru_cache(maxsize=4096)
def _emotion(token: str) -> str | None:
    try:
        emotion = normalize_emotion(token)
    except LabelError:
        return None
    return None if emotion == "other" else emotion  # "the other cues", "in other words"


def stated_emotions(text: str | None) -> list[tuple[str, bool]]:
    """The emotions ``text`` names, in order, each with whether it is denied: "sad, not angry" gives
    ``[("sad", False), ("angry", True)]``. Quoted words and questions state nothing; "other" is not read as one."""
    out = []
    for tokens, question in clauses(text):
        if question:
            continue
        negation = _negation_scope(tokens, set())
        out.extend((emotion, negation[i]) for i, token in enumerate(tokens) if (emotion := _emotion(token)))
    return out


def argued_emotion(text: str | None) -> str | None:
    """The emotion a rationale argues for: the last one it states without denying it (None when it states none)."""
    return next((emotion for emotion, denied in reversed(stated_emotions(text)) if not denied), None)
