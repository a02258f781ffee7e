"""Graceful shutdown of a qcluster node: SIGTERM (or Ctrl-C) and the node's slices let go of their work.

django-q2 stops a cluster by letting each worker finish the task it runs, which for a slice is up to
BATCHSITE_SLICE_SECONDS of claiming more. Our `qcluster` command (jobs/management/commands/qcluster.py)
puts one step first: it tells the worker processes, with SIGUSR1, that the node is going. A worker's
slices then claim nothing more, give back the items they claimed but did not send at once, hand their
chain over to another node (the next slice goes to the broker, which this node no longer reads), and
give the requests in flight BATCHSITE_SHUTDOWN_SECONDS to finish before those too are handed back. The
remote poller stops between rounds. So other nodes pick the work up within seconds, not a lease later.

Only the worker processes act on SIGUSR1: the cluster's other processes inherit "ignore" from the main
process, and each worker installs its handler when django-q spawns it (post_spawn, jobs/apps.py).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

REQUESTED = threading.Event()  # set in a worker process: the node is shutting down


def requested() -> bool:
    return REQUESTED.is_set()


def ignore_in_cluster_processes() -> None:
    """In the main qcluster process, before the cluster forks: its children ignore SIGUSR1 unless they install
    a handler (the default action would kill django-q's pusher and monitor)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def install_in_worker() -> None:
    """In a worker process (post_spawn, on its main thread): SIGUSR1 means the node is going."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGUSR1, _on_signal)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if not REQUESTED.is_set():
        log.info("worker %s: the node is shutting down; handing work over", os.getpid())
    REQUESTED.set()


def tell_workers(root: int | None = None) -> int:
    """SIGUSR1 to every process descended from `root` (this process by default); returns how many."""
    told = 0
    for pid in _descendants(root or os.getpid()):
        try:
            os.kill(pid, signal.SIGUSR1)
            told += 1
        except ProcessLookupError:
            pass
    return told


def _descendants(root: int) -> list[int]:
    """Processes below `root`, from /proc (Linux; elsewhere none: the slices then finish their time)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            # Field 4 of /proc/PID/stat is the parent; the name (field 2) may hold spaces, so split after it.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
