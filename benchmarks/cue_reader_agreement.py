"""How well a revision's cue reader reads the sentence table of ``tests/test_cues.py``, against this checkout's reader.

    python benchmarks/cue_reader_agreement.py [--rev dc64748~1]

Loads ``src/emoreason/data/cues.py`` as it was at ``--rev`` (``git show``) beside the current one, reads every
sentence of the table with both, and prints for each: the rows read exactly (the claims the table lists, nothing else)
and the (supported, contradicted) counts that match the table's on both measurements of the table (what the datagen
filter, the GRPO ``cue_grounding`` reward, the heuristic judge and the reasoning metric compute from them). Lists the
rows the old reader gets wrong with ``--show``.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_revision(rev: str):
    """The cue module at ``rev``, imported inside ``emoreason.data`` (so its relative imports resolve)."""
    source = subprocess.run(["git", "show", f"{rev}:src/emoreason/data/cues.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "cues_at_rev.py"
    path.write_text(source)
    name = "emoreason.data._cues_at_rev"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def score(reader, table, measured, as_strings, expected_counts) -> tuple[int, int, list[str]]:
    exact, counts, wrong = 0, 0, []
    for sentence, expected in table:
        got = as_strings(reader.extract_claims(sentence))
        exact += got == expected
        if got != expected:
            wrong.append(f"{sentence!r}: read {sorted(got)}, table {sorted(expected)}")
        for cues in measured.values():
            grounding = reader.ground(sentence, cues)
            counts += (len(grounding.supported), len(grounding.contradicted)) == expected_counts(expected, cues)
    return exact, counts, wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="dc64748~1", help="the revision whose reader is compared (default: the one "
                        "before issue 25's reader)")
    parser.add_argument("--show", action="store_true", help="list the rows the old reader misreads")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    import test_cues as table_module  # the table and its rule, as the tests use them

    from emoreason.data import cues as current

    table, measured = table_module.TABLE, table_module.MEASURED
    rows, checks = len(table), len(table) * len(measured)
    for label, reader in ((f"reader at {args.rev}", load_revision(args.rev)), ("this checkout's reader", current)):
        exact, counts, wrong = score(reader, table, measured, table_module.as_strings, table_module._expected)
        print(f"{label}: rows read exactly {exact}/{rows} ({exact / rows:.1%}); (supported, contradicted) counts "
              f"as the table's {counts}/{checks} ({counts / checks:.1%})")
        if args.show and reader is not current:
            print("\n".join(f"  {line}" for line in wrong))


if __name__ == "__main__":
    main()
