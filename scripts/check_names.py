"""A check `make check` runs: a task's dotted path (what django-q2 enqueues by) appears only in jobs/queue.py,
where tests/test_queue.py imports every one. Elsewhere, a renamed task would fail only when a worker took it."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASK_NAME = re.compile(r"""["']jobs\.(?:engine|ingest)\.[a-z_]+\.[a-z_]+["']""")


def main() -> int:
    found = []
    for path in sorted((ROOT / "jobs").rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[1] == "migrations" or relative == Path("jobs/queue.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if TASK_NAME.search(line):
                found.append(f"{relative}:{number}: {line.strip()}")
    if found:
        print("Task names belong in jobs/queue.py (call its functions instead):", *found, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
