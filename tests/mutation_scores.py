"""Print one line per mutated module, `MODULE killed/total (PCT%)`, from mutmut's results in mutants/.

Run by `make mutation` after `mutmut run`. A mutant counts as killed when a test failed or timed out on it;
survivors, suspicious ones and mutants that no selected test reaches count against the module.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mutmut.stats import status_by_exit_code

#: a failing or timed-out test run both mean the tests noticed the mutant
KILLED = {"killed", "timeout", "caught by type check"}
UNCOUNTED = {"not checked", "skipped"}


def scores(root: Path) -> list[tuple[str, int, int]]:
    out = []
    for meta in sorted(root.glob("src/**/*.py.meta")):
        statuses = [status_by_exit_code[c] for c in json.loads(meta.read_text())["exit_code_by_key"].values()]
        statuses = [s for s in statuses if s not in UNCOUNTED]
        if statuses:
            module = meta.relative_to(root / "src").with_suffix("").with_suffix("").as_posix().replace("/", ".")
            out.append((module, sum(s in KILLED for s in statuses), len(statuses)))
    return out


def main() -> int:
    rows = scores(Path(sys.argv[1] if len(sys.argv) > 1 else "mutants"))
    if not rows:
        print("no mutation results: run `mutmut run` first", file=sys.stderr)
        return 1
    for module, killed, total in rows:
        print(f"{module} {killed}/{total} ({100 * killed / total:.0f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
