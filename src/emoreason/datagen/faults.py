"""Fault injection for the tests: SIGKILL a datagen process at the n-th item of a phase (``acoustic`` or
``generate``), so that a test can crash a run at an arbitrary point and check that the restart loses nothing.
Both hooks do nothing unless their environment variable is set."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

KILL_HOOK_ENV = "EMOREASON_DATAGEN_KILL_AFTER"  # "<phase>:<n>": the local executor's processes
KILL_ONCE_ENV = "EMOREASON_DATAGEN_RAY_KILL_ONCE"  # "<phase>:<n>[,<phase>:<n>]": the Ray executor's actors


class KillHook:
    """SIGKILL this process after N items of a phase (``KILL_HOOK_ENV``)."""

    counts: dict[str, int] = {}  # per phase, for the whole process

    def __init__(self, phase: str):
        spec = os.environ.get(KILL_HOOK_ENV, "")
        hook_phase, _, count = spec.partition(":")
        self.phase = phase
        self.limit = int(count) if spec and hook_phase == phase and count.isdigit() else None

    def tick(self) -> None:
        if self.limit is None:
            return
        self.counts[self.phase] = self.counts.get(self.phase, 0) + 1
        if self.counts[self.phase] >= self.limit:
            os.kill(os.getpid(), signal.SIGKILL)


class KillOnce:
    """SIGKILL the actor's process at its n-th item of a phase, once per run (a marker file in the run's folder
    records the kill), so that the task Ray retries afterwards completes."""

    def __init__(self, spec: str, phase: str, marker_dir: str):
        limits = dict(part.split(":", 1) for part in spec.split(",") if ":" in part)
        self.limit = int(limits[phase]) if limits.get(phase, "").isdigit() else None
        self.marker = Path(marker_dir) / f"ray-killed-{phase}"
        self.count = 0

    def tick(self, item: str = "") -> None:
        if self.limit is None:
            return
        self.count += 1
        if self.count < self.limit:
            return
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, json.dumps({"pid": os.getpid(), "item": item, "count": self.count}).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
