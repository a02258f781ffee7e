"""The work queue (jobs/queue.py): every task name it holds is a function a worker can import, the schedules
name only its tasks, and no other module of the app names a task by its dotted path."""

import subprocess
import sys
from pathlib import Path

import pytest
from django.utils.module_loading import import_string

from jobs import queue


@pytest.mark.parametrize("name", queue.TASKS)
def test_every_task_name_is_a_function_a_worker_can_import(name):
    assert callable(import_string(name))


def test_the_schedules_name_only_the_queues_tasks():
    assert {func for func, _, _ in queue.SCHEDULES.values()} <= set(queue.TASKS)


def test_no_other_module_names_a_task(tmp_path):
    root = Path(__file__).resolve().parent.parent
    check = [sys.executable, str(root / "scripts" / "check_names.py")]
    assert subprocess.run(check, capture_output=True).returncode == 0
    # and the check does catch one: a copy of the tree with a task named in a model
    (tmp_path / "jobs" / "models").mkdir(parents=True)
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "check_names.py").write_text((root / "scripts" / "check_names.py").read_text())
    (tmp_path / "jobs" / "models" / "x.py").write_text('TASK = "jobs.engine.tasks.run_slice"\n')
    found = subprocess.run(
        [sys.executable, str(tmp_path / "scripts" / "check_names.py")], capture_output=True, text=True
    )
    assert found.returncode == 1 and "jobs/models/x.py:1" in found.stdout
