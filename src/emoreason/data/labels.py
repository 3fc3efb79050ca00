"""The common emotion taxonomy, per-corpus label maps, and votes -> soft labels.

Every corpus names its categories differently (IEMOCAP ``exc``, MSP-Podcast ``H``, MELD ``joy``); records carry
labels in one taxonomy so that training, rewards and metrics compare like with like. The maps follow the usual
practice in the speech-emotion literature, e.g. IEMOCAP "excited" merged into "happy" (as in most 4-class IEMOCAP
setups) and MELD "joy" read as "happy". Labels a corpus uses for "no agreement" map to ``None`` and are dropped from
vote counts.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

EMOTIONS: tuple[str, ...] = (
    "neutral",
    "happy",
    "sad",
    "angry",
    "fearful",
    "disgusted",
    "surprised",
    "contempt",
    "frustrated",
    "calm",
    "other",
)

# Lower-cased corpus label -> common taxonomy (None: the rater gave no usable category).
LABEL_MAPS: dict[str, dict[str, str | None]] = {
    "iemocap": {
        "neu": "neutral", "neutral": "neutral", "neutral state": "neutral",
        "hap": "happy", "happiness": "happy", "happy": "happy",
        "exc": "happy", "excited": "happy", "excitement": "happy",
        "sad": "sad", "sadness": "sad",
        "ang": "angry", "anger": "angry", "angry": "angry",
        "fru": "frustrated", "frustration": "frustrated", "frustrated": "frustrated",
        "fea": "fearful", "fear": "fearful",
        "sur": "surprised", "surprise": "surprised",
        "dis": "disgusted", "disgust": "disgusted",
        "oth": "other", "other": "other",
        "xxx": None,
    },
    "msp_podcast": {
        "n": "neutral", "neutral": "neutral",
        "h": "happy", "happy": "happy", "happiness": "happy",
        "s": "sad", "sad": "sad", "sadness": "sad",
        "a": "angry", "angry": "angry", "anger": "angry",
        "f": "fearful", "fear": "fearful",
        "d": "disgusted", "disgust": "disgusted",
        "u": "surprised", "surprise": "surprised",
        "c": "contempt", "contempt": "contempt",
        "o": "other", "other": "other",
        "x": None, "no agreement": None,
        # secondary-emotion vocabulary of the detailed label files
        "frustrated": "frustrated", "frustration": "frustrated",
        "annoyed": "angry", "excited": "happy", "amused": "happy", "concerned": "fearful",
        "depressed": "sad", "disappointed": "sad", "confused": "other", "calm": "calm", "bored": "other",
    },
    "crema_d": {
        "ang": "angry", "a": "angry", "dis": "disgusted", "d": "disgusted", "fea": "fearful", "f": "fearful",
        "hap": "happy", "h": "happy", "neu": "neutral", "n": "neutral", "sad": "sad", "s": "sad",
    },
    "ravdess": {
        "01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry", "06": "fearful",
        "07": "disgusted", "08": "surprised",
    },
    "meld": {
        "neutral": "neutral", "joy": "happy", "sadness": "sad", "anger": "angry", "fear": "fearful",
        "disgust": "disgusted", "surprise": "surprised",
    },
    "esd": {
        "neutral": "neutral", "happy": "happy", "angry": "angry", "sad": "sad", "surprise": "surprised",
    },
}

_SYNONYMS: dict[str, str] = {
    "happiness": "happy", "joy": "happy", "joyful": "happy", "excited": "happy",
    "sadness": "sad", "anger": "angry", "mad": "angry", "fear": "fearful", "afraid": "fearful", "scared": "fearful",
    "disgust": "disgusted", "surprise": "surprised", "frustration": "frustrated", "neutrality": "neutral",
}


class LabelError(ValueError):
    """A label that the taxonomy or the corpus map does not know."""


def normalize_emotion(label: str, corpus: str | None = None) -> str | None:
    """Map a corpus label (or a free-form emotion word) into the common taxonomy.

    Returns ``None`` for the corpus's "no agreement" codes; raises :class:`LabelError` for unknown labels.
    """
    key = label.strip().lower()
    if corpus is not None and corpus in LABEL_MAPS and key in LABEL_MAPS[corpus]:
        return LABEL_MAPS[corpus][key]
    if key in EMOTIONS:
        return key
    if key in _SYNONYMS:
        return _SYNONYMS[key]
    where = f" for corpus {corpus!r}" if corpus else ""
    raise LabelError(f"unknown emotion label {label!r}{where}; known: {', '.join(EMOTIONS)}")


def vote_distribution(votes: Iterable[str], labels: Iterable[str] | None = None) -> dict[str, float]:
    """Soft label by the all-inclusive rule: each emotion's share of all votes cast.

    ``labels`` fixes the keys (and their order); votes outside it are still counted in the denominator, so that a
    4-class view of a record does not pretend the other raters agreed.
    """
    counts = Counter(v for v in votes if v is not None)
    total = sum(counts.values())
    keys = list(labels) if labels is not None else sorted(counts)
    if total == 0:
        return {k: 0.0 for k in keys}
    return label_set_shares({k: c / total for k, c in counts.items()}, keys)


def label_set_shares(distribution: Mapping[str, float], labels: Iterable[str]) -> dict[str, float]:
    """A soft label seen through a label set, by the all-inclusive rule of :func:`vote_distribution`: each label
    keeps its share of ALL votes; the shares of emotions outside ``labels`` are not spread over the set (the result
    sums to less than 1 by exactly that out-of-set mass). Votes angry x2, frustrated x3 give angry 0.4 in a 4-class
    view, not 1.0."""
    return {k: float(distribution.get(k, 0.0)) for k in labels}


def consensus_label(distribution: Mapping[str, float]) -> str | None:
    """Plurality label, or ``None`` when the top share is tied (no consensus)."""
    if not distribution:
        return None
    ranked = sorted(distribution.items(), key=lambda kv: -kv[1])
    if ranked[0][1] <= 0 or (len(ranked) > 1 and math.isclose(ranked[0][1], ranked[1][1])):
        return None
    return ranked[0][0]


def multi_label(distribution: Mapping[str, float], num_classes: int | None = None) -> list[str]:
    """Emotions present by the 1/C rule: share strictly above 1/C, C the number of classes."""
    c = num_classes or len(distribution)
    if c <= 0:
        return []
    return [k for k, share in distribution.items() if share > 1.0 / c]


def entropy(distribution: Mapping[str, float], base: float = 2.0) -> float:
    """Shannon entropy of a soft label (0 = unanimous raters)."""
    return -sum(p * math.log(p, base) for p in distribution.values() if p > 0)


def cooccurrence_matrix(
    clips_votes: Iterable[Iterable[str | None]], labels: Iterable[str] | None = None
) -> dict[str, object]:
    """Emotion co-occurrence from the training split's votes, for penalisation losses and reports.

    ``clips_votes``: per clip, the emotions its raters gave (primary and, if wanted, secondary). ``counts[i][j]`` is
    the number of clips where both ``i`` and ``j`` received at least one vote (``counts[i][i]``: clips where ``i``
    did); ``conditional[i][j] = counts[i][j] / counts[i][i]`` (how often raters who hear ``i`` are joined by ``j``);
    ``penalty = 1 - conditional``, 0 on the diagonal: confusing two emotions that raters often mix costs little.
    """
    sets = [{v for v in votes if v is not None} for votes in clips_votes]
    keys = list(labels) if labels is not None else sorted(set().union(*sets)) if sets else []
    index = {k: i for i, k in enumerate(keys)}
    counts = [[0] * len(keys) for _ in keys]
    for present in sets:
        idx = [index[e] for e in present if e in index]
        for i in idx:
            for j in idx:
                counts[i][j] += 1
    conditional = [[(counts[i][j] / counts[i][i]) if counts[i][i] else 0.0 for j in range(len(keys))]
                   for i in range(len(keys))]
    penalty = [[0.0 if i == j else 1.0 - conditional[i][j] for j in range(len(keys))] for i in range(len(keys))]
    return {"labels": keys, "counts": counts, "conditional": conditional, "penalty": penalty, "clips": len(sets)}


def load_cooccurrence(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A co-occurrence matrix (datagen's ``cooccurrence.json`` or the dict :func:`cooccurrence_matrix` returns),
    checked: ``labels`` and a square ``penalty`` of matching size, every entry in [0, 1], a zero diagonal."""
    if isinstance(source, Mapping):
        matrix, where = dict(source), "co-occurrence matrix"
    else:
        path = Path(source)
        if not path.is_file():
            raise LabelError(f"co-occurrence matrix {path} does not exist (datagen writes cooccurrence.json)")
        try:
            matrix = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise LabelError(f"co-occurrence matrix {path} is not JSON: {err}") from None
        where = str(path)
    labels, penalty = matrix.get("labels"), matrix.get("penalty")
    if not isinstance(labels, list) or not labels or not isinstance(penalty, list) or len(penalty) != len(labels):
        raise LabelError(f"{where}: needs 'labels' and a square 'penalty' with one row per label")
    for i, row in enumerate(penalty):
        if not isinstance(row, list) or len(row) != len(labels):
            raise LabelError(f"{where}: penalty row {labels[i]!r} has {len(row) if isinstance(row, list) else row} "
                             f"entries, expected {len(labels)}")
        if any(not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0 for v in row) or row[i] != 0:
            raise LabelError(f"{where}: penalty row {labels[i]!r} must hold values in [0, 1] and 0 on the diagonal")
    return matrix


def confusion_credit(predicted: str, reference: str, matrix: Mapping[str, Any], partial_scale: float = 0.5) -> float:
    """Credit for answering ``predicted`` when the annotators' consensus is ``reference``, from the penalty of
    :func:`cooccurrence_matrix`: 1 for the consensus itself; ``partial_scale * (1 - penalty[reference][predicted])``
    for another emotion, so a confusion raters themselves make often (angry heard with frustrated) earns partial
    credit and one they never make earns nothing. ``partial_scale`` < 1 keeps the consensus the best answer.
    Emotions outside the matrix's labels earn 0."""
    if predicted == reference:
        return 1.0
    index = {label: i for i, label in enumerate(matrix["labels"])}
    if predicted not in index or reference not in index:
        return 0.0
    return partial_scale * (1.0 - float(matrix["penalty"][index[reference]][index[predicted]]))
