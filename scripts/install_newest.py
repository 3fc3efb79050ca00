"""Install the newest *installable* release of a package beside the pinned stack, for ``make test-newest``.

``pip install --no-deps transformers`` takes the newest upload even when its declared requirements cannot be met
from the registry (transformers 5.25.0 requires ``kernels>=0.19.1``, which the registry here does not carry, and then
fails at every ``from_pretrained``). Instead pip's resolver is asked, with ``--dry-run --report``, what an upgrade of
the package in *this* environment would install: the newest release whose requirements resolve, plus only the
dependencies that must change. Exactly those are installed with ``--no-deps`` into a folder that is put first on
``PYTHONPATH``, so the pinned virtual environment itself is never modified.

    python scripts/install_newest.py --target .cache/tf-newest "transformers" "trl"
    python scripts/install_newest.py --target .cache/tf-5.24.0 "transformers==5.24.0"
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def resolve(specs: list[str]) -> list[tuple[str, str]]:
    """(name, version) of everything pip would install to upgrade ``specs`` in this environment, resolved together
    (one answer for a dependency they share)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--upgrade",
             "--upgrade-strategy", "only-if-needed", "--report", str(report), *specs],
            check=True,
        )
        items = json.loads(report.read_text())["install"]
    return [(item["metadata"]["name"], item["metadata"]["version"]) for item in items]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="folder to install into (put it first on PYTHONPATH)")
    parser.add_argument("spec", nargs="+", help='requirements, e.g. "transformers" "trl" or "transformers==5.24.0"')
    args = parser.parse_args(argv)
    pins = [f"{name}=={version}" for name, version in resolve(args.spec)]
    if not pins:
        print(f"{' '.join(args.spec)}: already satisfied by the pinned environment; nothing to install")
        return 0
    print("installing beside the pinned stack:", " ".join(pins))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--upgrade", "--no-deps", "--target", args.target, *pins],
        check=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
