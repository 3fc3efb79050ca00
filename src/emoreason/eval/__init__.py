"""Evaluation: an OpenAI-compatible client with caching and retries, test-time-scaling strategies, metrics, reports.

``run_suite(suite, endpoint, model, out_dir, records=..., data_root=...)`` is the Python entry point (the demo calls
it); ``emoreason eval`` is the command line.
"""

from __future__ import annotations


def run_suite(*args, **kwargs):
    from .runner import run_suite as _run_suite

    return _run_suite(*args, **kwargs)


__all__ = ["run_suite"]
