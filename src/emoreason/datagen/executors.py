"""Where a datagen run computes its shards, by name (``executor:`` in the config, ``--executor`` on the command
line): ``local`` (this machine; hand-started workers share a run with ``num_workers``/``worker_index``) or ``ray``
(Ray Data over a cluster, ray_executor.py). Every executor writes the same shards and outputs (pipeline.py)."""

from __future__ import annotations

from contextlib import nullcontext

from .pipeline import DatagenConfig, LocalExecutor
from .pipeline import run as run_pipeline


def _ray(cfg: DatagenConfig):
    from .ray_executor import RayExecutor

    try:
        import ray  # noqa: F401
    except ImportError:
        raise ValueError("executor ray needs Ray: pip install 'emoreason[ray]'") from None
    return RayExecutor(cfg.ray, cfg)


EXECUTORS = {"local": lambda cfg: nullcontext(LocalExecutor()), "ray": _ray}


def run(cfg: DatagenConfig) -> dict:
    """:func:`pipeline.run` on the executor ``cfg.executor`` names."""
    with EXECUTORS[cfg.executor](cfg) as executor:
        return run_pipeline(cfg, executor)
