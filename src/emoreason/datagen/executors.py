"""Where a datagen run computes its shards, by name (``executor:`` in the config, ``--executor`` on the command
line): ``local`` (this machine: acoustic shards in a process pool, generation shards in this process; hand-started
workers share a run with ``num_workers``/``worker_index``) or ``ray`` (Ray Data over a cluster, ray_executor.py).
Every executor writes the same shards and outputs (pipeline.py runs the plan, resume and merge for all of them)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, nullcontext

from ..data.schema import EmotionRecord
from .acoustic_phase import analyze_shard
from .config import DatagenConfig
from .generation import Generator

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def exit_with_parent(parent_pid: int, poll_seconds: float = 1.0) -> None:
    """Pool initializer: this worker dies with the process that started it (a killed datagen run must not leave
    workers writing shards). Linux: the kernel sends SIGKILL on the parent's death (PR_SET_PDEATHSIG); everywhere:
    a daemon thread also watches the parent pid."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)

    def watch():
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers, initializer=exit_with_parent, initargs=(os.getpid(),))


class LocalExecutor:
    """Runs both passes on this machine: acoustic shards in a process pool of ``acoustic.workers``, generation shards
    one after the other in this process. The Ray executor (ray_executor.py) has the same two methods."""

    def analyze(self, jobs: list[tuple], cfg: DatagenConfig):
        """``(index, rows)`` for each acoustic job (``analyze_shard``'s arguments), its shard file written."""
        if cfg.acoustic.workers > 1 and len(jobs) > 1:
            with worker_pool(cfg.acoustic.workers) as pool:
                yield from pool.map(analyze_shard, jobs)
        else:
            for job in jobs:
                yield analyze_shard(job)

    def generate(self, generator: Generator, jobs: list[tuple[int, list[EmotionRecord]]]):
        """``(index, outputs)`` for each ``(shard index, records)``, in order (``dedup_scope: run`` needs it)."""
        for index, records in jobs:
            yield index, generator.shard(records)


def _ray(cfg: DatagenConfig):
    from .ray_executor import RayExecutor

    try:
        import ray  # noqa: F401
    except ImportError:
        raise ValueError("executor ray needs Ray: pip install 'emoreason[ray]'") from None
    return RayExecutor(cfg.ray, cfg)


EXECUTORS = {"local": lambda cfg: nullcontext(LocalExecutor()), "ray": _ray}


def open_executor(cfg: DatagenConfig) -> AbstractContextManager:
    """The executor ``cfg.executor`` names, as a context manager (Ray connects on entry and disconnects on exit)."""
    return EXECUTORS[cfg.executor](cfg)
