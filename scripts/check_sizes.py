"""A check `make check` runs: no module under jobs/ passes 500 lines (STYLE.md: past that, split it along its
concerns). A long module hides a second concern that wants its own file name; migrations are generated."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 500


def main() -> int:
    found = []
    for path in sorted((ROOT / "jobs").rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[1] == "migrations":
            continue
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            found.append(f"{relative}: {lines} lines")
    if found:
        print(f"Modules over {MAX_LINES} lines (split each along its concerns):", *found, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
