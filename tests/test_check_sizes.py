"""scripts/check_sizes.py, which `make check` runs: a module of jobs/ over 500 lines fails it, named with its length."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _check(tree: Path) -> subprocess.CompletedProcess:
    (tree / "scripts").mkdir()
    (tree / "scripts" / "check_sizes.py").write_text((ROOT / "scripts" / "check_sizes.py").read_text())
    return subprocess.run([sys.executable, str(tree / "scripts" / "check_sizes.py")], capture_output=True, text=True)


def test_a_module_over_500_lines_fails_naming_it_and_its_length(tmp_path):
    (tmp_path / "jobs" / "engine").mkdir(parents=True)
    (tmp_path / "jobs" / "engine" / "long.py").write_text("x = 1\n" * 501)
    (tmp_path / "jobs" / "short.py").write_text("x = 1\n" * 500)
    found = _check(tmp_path)
    assert found.returncode == 1
    assert "jobs/engine/long.py: 501 lines" in found.stdout and "short.py" not in found.stdout


def test_migrations_may_be_long(tmp_path):
    (tmp_path / "jobs" / "migrations").mkdir(parents=True)
    (tmp_path / "jobs" / "migrations" / "0001_initial.py").write_text("x = 1\n" * 2000)
    assert _check(tmp_path).returncode == 0
