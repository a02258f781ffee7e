"""The suite's closing line: both passes' pytest summaries added up, and each pass's wall time.

python scripts/test_totals.py var/test-logs/sqlite.log var/test-logs/postgres-redis.log
"""

import re
import sys
from pathlib import Path

COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected)")
SUMMARY = re.compile(r"^=*\s*\d+ (passed|failed|errors?|skipped|deselected)\b.* in [\d.]+s")


def main(paths: list[str]) -> None:
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    for path in map(Path, paths):
        if not path.exists():
            continue
        lines = path.read_text(errors="replace").splitlines()
        summary = next((line for line in reversed(lines) if SUMMARY.match(line)), "")
        timing = next((line for line in reversed(lines) if line.startswith(f"{path.stem}: ")), "")
        for number, word in COUNT.findall(summary):
            word = "failed" if word.startswith("error") else word
            if word in totals:
                totals[word] += int(number)
        print(
            f"{path.stem}: {summary.strip('= ') or 'no summary (the pass did not finish)'}; {timing.split(': ', 1)[-1]}"
        )
    print(f"total: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped")


if __name__ == "__main__":
    main(sys.argv[1:])
