from django.core.management import call_command
from django.core.management.base import BaseCommand

from jobs import tokens
from jobs.models import Endpoint


class Command(BaseCommand):
    help = (
        "Idempotent set-up after installing: migrations (which also register the sweeper and clean-up "
        "schedules), static files, offline token data, default endpoint."
    )

    def handle(self, *args, **options):
        call_command("migrate", interactive=False, verbosity=0)
        call_command("collectstatic", interactive=False, verbosity=0)
        tokens.seed_cache()
        Endpoint.sync_from_env()
        self.stdout.write("Batchsite is set up.")
