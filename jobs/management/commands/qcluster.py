"""django-q2's `qcluster`, with a graceful stop: on SIGTERM or Ctrl-C the workers are told first, so their
slices hand their work to other nodes at once (jobs/engine/shutdown.py), then django-q stops as it does."""

import logging

from django_q.cluster import Cluster
from django_q.management.commands.qcluster import Command as QClusterCommand

from jobs.engine import shutdown

log = logging.getLogger(__name__)


class Command(QClusterCommand):
    def handle(self, *args, **options):
        shutdown.ignore_in_cluster_processes()
        stop = Cluster.sig_handler

        def tell_workers_then_stop(cluster, signum, frame):
            told = shutdown.tell_workers()
            log.info("Stopping: %s cluster processes told to hand their work over.", told)
            stop(cluster, signum, frame)

        Cluster.sig_handler = tell_workers_then_stop
        super().handle(*args, **options)
