"""Prompt sets: the system prompt, one instruction per answer style (direct, cot) and the follow-ups some strategies
send (refine, the budget-forcing nudge), read from YAML files under ``eval/prompts/``.

Their own module so that the strategies (which use them) and the suite (which names their file) both depend on it
and not on each other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

DEFAULT_PROMPTS = "eval/prompts/emotion.yaml"


class SuiteError(ValueError):
    """A suite or prompt-set file that cannot be used; the message names the file and the field."""


@dataclass
class PromptSet:
    system: str | None
    styles: dict[str, str]
    transcript: str | None = None
    refine: str | None = None
    budget_wait: str = "Wait,"

    @classmethod
    def load(cls, path: str | os.PathLike) -> PromptSet:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(data.get("styles"), dict) or not data["styles"]:
            raise SuiteError(f"{path}: 'styles' must map style names (direct, cot) to prompts")
        return cls(system=data.get("system"), styles=dict(data["styles"]), transcript=data.get("transcript"),
                   refine=data.get("refine"), budget_wait=data.get("budget_wait", "Wait,"))
