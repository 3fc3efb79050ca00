"""Evaluation suites (YAML): which records, which prompts, which label set, which strategies and metrics.

Paths in a suite are relative to the directory the evaluator runs in (the repository root) and may use environment
variables (``${EMOREASON_DATA}/iemocap/records.jsonl``); ``--records`` / ``--data-root`` override them.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data.labels import EMOTIONS
from .prompts import DEFAULT_PROMPTS, SuiteError
from .strategies import STRATEGIES

DEFAULT_METRICS = ("classification", "multilabel", "distribution", "calibration", "ambiguity", "groups",
                   "reasoning", "judge")


@dataclass
class StrategySpec:
    name: str
    label: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Suite:
    name: str
    records: Path
    data_root: Path
    labels: tuple[str, ...]
    strategies: list[StrategySpec]
    split: str | None = "test"
    prompts: Path = Path(DEFAULT_PROMPTS)
    include_transcript: bool = False
    metrics: tuple[str, ...] = DEFAULT_METRICS
    max_tokens: int = 256
    limit: int | None = None
    group_by: tuple[str, ...] = ("gender", "speaker", "corpus")
    ambiguity_bins: int = 3
    min_group_count: int = 10  # groups and ambiguity bins smaller than this are listed but not in gaps / merged
    seed: int = 0  # each request's seed derives from it and the record
    concurrency: int = 8
    timeout: float = 120.0
    retries: int = 3
    audio_transport: str = "input_audio"
    judge: dict[str, Any] | None = None
    verifier: dict[str, Any] | None = None  # audio verifier: endpoint, model, api_key, rubric (default: the model)
    source: Path | None = None


def _path(value: Any, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise SuiteError(f"{where} must be a path")
    return Path(os.path.expandvars(value))


def load_suite(path: str | os.PathLike, records: str | os.PathLike | None = None,
               data_root: str | os.PathLike | None = None) -> Suite:
    """Read and validate a suite; ``records`` / ``data_root`` override the file's (data root defaults to the records'
    folder)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise SuiteError(f"{path}: cannot read suite ({err})") from None
    if not isinstance(data, dict):
        raise SuiteError(f"{path}: a suite is a mapping")
    known = {f for f in Suite.__dataclass_fields__} - {"source"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SuiteError(f"{path}: unknown field(s) {unknown}; known: {sorted(known)}")
    where = str(path)
    records_path = Path(records) if records is not None else _path(data.get("records"), f"{where}: records")
    root = data_root if data_root is not None else data.get("data_root")
    root_path = Path(root) if isinstance(root, os.PathLike) else (_path(root, f"{where}: data_root") if root
                                                                   else records_path.parent)
    labels = tuple(data.get("labels") or ())
    if not labels or any(label not in EMOTIONS for label in labels):
        raise SuiteError(f"{where}: labels must be a non-empty list from the taxonomy {EMOTIONS}, got {labels}")
    specs = []
    for i, entry in enumerate(data.get("strategies") or []):
        entry = {"name": entry} if isinstance(entry, str) else dict(entry)
        name = entry.pop("name", None)
        if name not in STRATEGIES:
            raise SuiteError(f"{where}: strategies[{i}]: unknown strategy {name!r}; known: {sorted(STRATEGIES)}")
        label = str(entry.pop("label", name))
        accepted = set(inspect.signature(STRATEGIES[name]).parameters) - {"ctx", "record"}
        bad = sorted(set(entry) - accepted)
        if bad:
            raise SuiteError(f"{where}: strategies[{i}] ({name}): unknown parameter(s) {bad}; "
                             f"accepted: {sorted(accepted)}")
        specs.append(StrategySpec(name=name, label=label, params=entry))
    if not specs:
        raise SuiteError(f"{where}: list at least one strategy")
    if len({s.label for s in specs}) != len(specs):
        raise SuiteError(f"{where}: strategy labels must be unique (set `label:` on repeated strategies)")
    metrics = tuple(data.get("metrics") or DEFAULT_METRICS)
    from .metrics import METRIC_GROUPS

    bad_metrics = sorted(set(metrics) - set(METRIC_GROUPS))
    if bad_metrics:
        raise SuiteError(f"{where}: unknown metric group(s) {bad_metrics}; known: {sorted(METRIC_GROUPS)}")
    transport = data.get("audio_transport", "input_audio")
    if transport not in ("input_audio", "file_url"):
        raise SuiteError(f"{where}: audio_transport must be input_audio or file_url")
    split = data.get("split", "test")
    return Suite(
        name=str(data.get("name") or path.stem), records=records_path, data_root=Path(root_path), labels=labels,
        strategies=specs, split=split, prompts=_path(data.get("prompts", DEFAULT_PROMPTS), f"{where}: prompts"),
        include_transcript=bool(data.get("include_transcript", False)), metrics=metrics,
        max_tokens=int(data.get("max_tokens", 256)), limit=data.get("limit"),
        group_by=tuple(data.get("group_by") or ()), ambiguity_bins=int(data.get("ambiguity_bins", 3)),
        concurrency=int(data.get("concurrency", 8)), timeout=float(data.get("timeout", 120.0)),
        retries=int(data.get("retries", 3)), audio_transport=transport, judge=data.get("judge"), source=path,
        min_group_count=int(data.get("min_group_count", 10)), seed=int(data.get("seed", 0)),
        verifier=data.get("verifier"),
    )
