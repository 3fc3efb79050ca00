"""Corpus adapters: each corpus's own layout -> :class:`~emoreason.data.schema.EmotionRecord` lists.

Adapters are looked up by name in :data:`ADAPTERS` (``load_corpus("iemocap", root, **options)``). Every adapter keeps
every rating it finds (``votes``), fills the soft label by the all-inclusive rule, the consensus label, speaker,
gender, split, transcript and, for dialogue corpora, the prior turns as ``context``. Audio paths are relative to the
corpus root. Clips whose audio header cannot be read are not dropped silently: they come back in
:attr:`CorpusLoad.errors` with the reason, and the caller writes them to its errors file.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..audio import AudioError, duration_of
from ..labels import consensus_label, vote_distribution
from ..schema import EmotionRecord, Vote, resolve_under_root

# name -> "module:function"; modules are imported on use.
ADAPTERS: dict[str, str] = {
    "iemocap": "emoreason.data.corpora.iemocap:load",
    "msp_podcast": "emoreason.data.corpora.msp_podcast:load",
    "crema_d": "emoreason.data.corpora.crema_d:load",
    "ravdess": "emoreason.data.corpora.ravdess:load",
    "meld": "emoreason.data.corpora.meld:load",
    "esd": "emoreason.data.corpora.esd:load",
    "manifest": "emoreason.data.corpora.manifest:load",
    "synthetic": "emoreason.data.corpora.synthetic:load",
}


class CorpusError(ValueError):
    """A corpus tree that an adapter cannot read (missing label files, unknown layout)."""


@dataclass
class CorpusLoad:
    records: list[EmotionRecord] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)  # {"id", "audio", "reason"}
    root: Path | None = None


def get_adapter(name: str) -> Callable[..., CorpusLoad]:
    if name not in ADAPTERS:
        raise CorpusError(f"unknown corpus adapter {name!r}; known: {', '.join(sorted(ADAPTERS))}")
    module_name, func_name = ADAPTERS[name].split(":")
    return getattr(importlib.import_module(module_name), func_name)


def load_corpus(name: str, root: str | os.PathLike, **options) -> CorpusLoad:
    root = Path(root)
    if not root.exists():
        raise CorpusError(f"corpus root {str(root)!r} does not exist")
    adapter = get_adapter(name)
    accepted = set(inspect.signature(adapter).parameters) - {"root"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise CorpusError(f"unknown option(s) {unknown} for corpus adapter {name!r}; known: {sorted(accepted)}")
    result = adapter(root, **options)
    result.root = root
    return result


# -- helpers shared by the adapters ----------------------------------------------------------------------------
def make_record(
    load: CorpusLoad,
    root: Path,
    *,
    id: str,
    audio: str,
    corpus: str,
    votes: list[Vote] | None = None,
    label: str | None = None,
    duration: float | None = None,
    **fields,
) -> EmotionRecord | None:
    """Build a record with distribution + consensus from its votes; a bad audio file goes to ``load.errors``."""
    votes = list(votes or [])
    try:
        path = resolve_under_root(audio, root, record=id)
        if not path.is_file():
            raise AudioError(str(path), "file not found")
        if duration is None:
            duration = duration_of(path)
    except (AudioError, ValueError) as err:
        load.errors.append({"id": id, "audio": audio, "corpus": corpus, "reason": str(err)})
        return None
    emotions = [v.emotion for v in votes if v.emotion is not None]
    distribution = vote_distribution(emotions) if emotions else ({label: 1.0} if label else {})
    consensus = label if label is not None else consensus_label(distribution)
    record = EmotionRecord(id=id, audio=audio, duration=float(duration), corpus=corpus, votes=votes,
                           distribution=distribution, label=consensus, **fields)
    load.records.append(record)
    return record


def speaker_split(speaker: str, validation: float = 0.1, test: float = 0.1, salt: str = "") -> str:
    """Deterministic speaker-independent split from a hash of the speaker id (stable as a corpus grows)."""
    bucket = int(hashlib.sha1(f"{salt}{speaker}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if bucket < test:
        return "test"
    if bucket < test + validation:
        return "validation"
    return "train"


def read_text(path: Path) -> str:
    """Label files come as UTF-8, UTF-8 with BOM or UTF-16 (ESD's Chinese speakers)."""
    raw = path.read_bytes()
    for encoding in ("utf-8-sig", "utf-16"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")


def single_vote(emotion: str | None, rater: str = "corpus") -> list[Vote]:
    return [Vote(rater=rater, emotion=emotion)] if emotion else []


def files_under(root: Path, pattern: str) -> Iterable[Path]:
    return sorted(root.glob(pattern))
