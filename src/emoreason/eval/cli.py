"""`emoreason eval --suite eval/suites/<name>.yaml --endpoint URL --model NAME`: evaluate an endpoint on a suite.

Writes ``report.json``, ``report.md``, ``report.html`` (the run clip by clip), ``plots/``,
``predictions/<strategy>.jsonl`` and the response cache (``responses.sqlite``) under ``--out``. Rerunning with the
same ``--out`` resumes: cached answers are not asked again. Exit status 1 when items failed after retries (they are
in the report, counted as invalid).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emoreason eval", description=__doc__.splitlines()[0])
    p.add_argument("--suite", required=True, help="suite YAML (eval/suites/*.yaml)")
    p.add_argument("--endpoint", "--base-url", dest="endpoint", action="append", required=True,
                   help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1; repeat it for replicas of the "
                        "model (requests go to the least busy; a failing one is taken out, its requests sent to the "
                        "others)")
    p.add_argument("--model", required=True, help="model name the endpoint serves")
    p.add_argument("--out", default="runs/eval", help="output folder (report, plots, predictions, cache)")
    p.add_argument("--records", default=None, help="override the suite's records file (JSONL or parquet)")
    p.add_argument("--data-root", default=None, help="override the suite's data root (default: the records' folder)")
    p.add_argument("--api-key", default=os.environ.get("EMOREASON_API_KEY"),
                   help="Bearer key for the endpoint (default: $EMOREASON_API_KEY)")
    p.add_argument("--strategies", nargs="+", default=None, help="run only these strategy labels of the suite")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")
    p.add_argument("--max-tokens", type=int, default=None, help="generation budget per answer (default: the suite's)")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight (default: the suite's)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per request (default: the suite's)")
    p.add_argument("--retries", type=int, default=None, help="retries per request (default: the suite's)")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubled per retry")
    p.add_argument("--cache", default=None, help="response cache file (default: OUT/responses.sqlite)")
    p.add_argument("--judge-endpoint", default=None, help="judge model endpoint (overrides the suite's judge)")
    p.add_argument("--judge-model", default=None)
    p.add_argument("--judge-api-key", default=os.environ.get("EMOREASON_JUDGE_API_KEY"))
    p.add_argument("--embed-audio", action="store_true",
                   help="inline the clips' audio in report.html (default: relative paths to the clips)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ..data.schema import RecordError
    from .runner import run_suite
    from .suite import SuiteError

    try:
        report = run_suite(
            args.suite, args.endpoint[0] if len(args.endpoint) == 1 else args.endpoint, args.model, args.out,
            records=args.records, data_root=args.data_root,
            api_key=args.api_key, strategies=args.strategies, limit=args.limit, max_tokens=args.max_tokens,
            concurrency=args.concurrency,
            timeout=args.timeout, retries=args.retries, backoff=args.backoff, cache_path=args.cache,
            judge_endpoint=args.judge_endpoint, judge_model=args.judge_model, judge_api_key=args.judge_api_key,
            progress=not args.no_progress,
        )
    except (SuiteError, RecordError, ValueError, FileNotFoundError) as err:
        print(f"emoreason eval: {err}", file=sys.stderr)
        return 2
    if args.embed_audio:
        from .html_report import write_html
        from .report import finite_json

        write_html(finite_json(report), args.out, embed_audio=True)
    failed = {name: len(s["failures"]) for name, s in report["strategies"].items() if s["failures"]}
    for name, s in report["strategies"].items():
        acc = s["metrics"].get("classification", {}).get("accuracy")
        acc_text = f"{acc:.3f}" if acc is not None else "-"
        print(f"{name}: accuracy {acc_text}, {s['tokens']['total_per_item']:.1f} tokens/item (prompt + completion), "
              f"{len(s['failures'])} failed")
    print(f"report: {report['files']['markdown']} (browse clip by clip: {report['files'].get('html')})")
    if failed:
        print(f"emoreason eval: items failed after retries {failed}; see report.md", file=sys.stderr)
        return 1
    return 0


def build_report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emoreason report",
                                description="report pages of finished runs: compare two runs, or rewrite one's page")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="two runs over the same suite: flipped clips, paired differences with 95%% "
                                       "intervals, McNemar for accuracy (compare.json, compare.md, report.html)")
    c.add_argument("run_a", help="the baseline run's folder (or its report.json)")
    c.add_argument("run_b", help="the run compared with it")
    c.add_argument("--out", default=None, help="output folder (default: RUN_B/compare-<RUN_A's name>)")
    c.add_argument("--labels", nargs=2, default=None, metavar=("A", "B"), help="names of the runs (default: folders)")
    c.add_argument("--draws", type=int, default=1000, help="bootstrap draws (default 1000)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--embed-audio", action="store_true", help="inline the clips' audio in the page")
    h = sub.add_parser("html", help="rewrite a run's report.html from its report.json (e.g. with --embed-audio)")
    h.add_argument("run", help="the run's folder")
    h.add_argument("--embed-audio", action="store_true")
    return p


def report_main(argv: list[str] | None = None) -> int:
    """`emoreason report compare RUN_A RUN_B` / `emoreason report html RUN`."""
    args = build_report_parser().parse_args(argv)
    from .compare import CompareError, load_report, write_compare
    from .html_report import write_html

    try:
        if args.command == "html":
            report, run_dir = load_report(args.run)
            print(f"report: {write_html(report, run_dir, embed_audio=args.embed_audio)}")
            return 0
        out = args.out or os.path.join(str(args.run_b), f"compare-{os.path.basename(os.path.normpath(args.run_a))}")
        result = write_compare(args.run_a, args.run_b, out, labels=tuple(args.labels) if args.labels else None,
                               draws=args.draws, seed=args.seed, embed_audio=args.embed_audio)
    except CompareError as err:
        print(f"emoreason report: {err}", file=sys.stderr)
        return 2
    for name, s in result["strategies"].items():
        acc = s["differences"].get("classification.accuracy")
        flips = s["flips"]
        line = f"{name}: {len(flips['right_to_wrong'])} right -> wrong, {len(flips['wrong_to_right'])} wrong -> right"
        if acc:
            line += (f"; accuracy {acc['a']:.3f} -> {acc['b']:.3f} ({acc['difference']:+.3f} "
                     f"[{acc['low']:+.3f}, {acc['high']:+.3f}], McNemar p={acc['p_value']:.3f})")
        print(line)
    print(f"report: {result['files']['html']}")
    return 0
