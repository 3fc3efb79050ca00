"""The files of a resumable run: JSONL rows, atomic writes, the fixed shard plan, and the rewrite of a finished shard
whose teacher requests are generated again. A shard counts as done when its file or folder exists: everything that
becomes one is written under a temporary name and renamed into place."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .config import ConfigError


def jsonl_text(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text(jsonl_text(rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def temporary_path(path: Path) -> Path:
    # Per process: workers sharing a run may write the same (identical) file at the same moment.
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def atomic_text(path: Path, text: str) -> None:
    """Write ``text`` under a temporary name, then rename it into place: readers see the old file or the new one."""
    tmp = temporary_path(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_json(path: Path, data) -> None:
    atomic_text(path, json.dumps(data, indent=2, ensure_ascii=False))


def atomic_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_text(path, jsonl_text(rows))


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    """A clip counter that starts at the clips a resumed run already has."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="clip", disable=not enabled, dynamic_ncols=True)


def split_into_shards(ids: list[str], size: int) -> list[list[str]]:
    return [ids[i: i + size] for i in range(0, len(ids), size)]


def fixed_plan(out: Path, name: str, shards: list[list[str]]) -> list[list[str]]:
    """Fix the shard plan on the first start; a resumed run must see the same inputs in the same shards."""
    path = out / f"plan_{name}.json"
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved != shards:
            raise ConfigError(
                f"{out} holds a run with a different {name} plan (inputs, limit, splits or shard_size changed); "
                "resume with the same settings, or use a new output_dir")
        return saved
    atomic_json(path, shards)
    return shards


def teacher_failures(shard: Path) -> set[str]:
    """Ids of a finished shard's records with a failed teacher request (the record or one of its pair negatives)."""
    return {row["id"] for row in read_jsonl(shard / "rejected.jsonl") if row.get("reason") == "teacher_error"}


def rewrite_shard(result: dict[str, list[dict]], final: Path, ids: list[str], retry_ids: set[str],
                  tmp_suffix: str) -> None:
    """Rewrite a shard with ``result``, ``retry_ids`` generated again: their old rows out, the new ones in, in the
    plan's order.

    The new shard is written beside the old one and swapped in with two renames; a crash between them leaves no
    finished shard, which the next start then generates whole (the stale copy is removed on start)."""
    rank = {record_id: k for k, record_id in enumerate(ids)}
    tmp = final.with_name(final.name + tmp_suffix)
    tmp.mkdir()
    for name, new_rows in result.items():
        rows = [row for row in read_jsonl(final / f"{name}.jsonl") if row.get("id") not in retry_ids] + new_rows
        rows.sort(key=lambda row: rank.get(row.get("id"), len(rank)))  # stable: a record's own rows keep their order
        write_jsonl(tmp / f"{name}.jsonl", rows)
    old = final.with_name(final.name + ".old" + tmp_suffix)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old)
