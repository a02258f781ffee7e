import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from jobs.secretfile import read_or_create


class Command(BaseCommand):
    help = "Create the demo login (once, with a random password kept in the data dir) and print it."

    def add_arguments(self, parser):
        parser.add_argument("--quiet-if-disabled", action="store_true")

    def handle(self, *args, **options):
        if not settings.BATCHSITE_DEMO_USER:
            if not options["quiet_if_disabled"]:
                self.stdout.write("The demo login is disabled (BATCHSITE_DEMO_USER=0).")
            return
        path = settings.DATA_DIR / "demo-password"
        user = get_user_model().objects.filter(username="demo").first()
        if user is not None and not path.exists():
            # An account named demo that this data dir did not make (another person's, or a data dir made
            # again): never take it over. Its rights and password stay as they are.
            self.stdout.write("  An account named demo exists already; its password is not known here.")
            return
        password = read_or_create(path, lambda: secrets.token_urlsafe(9))
        if user is None:
            user = get_user_model()(username="demo", email="demo@example.com")
            user.is_staff = user.is_superuser = True  # the demo's one person may do everything, prices too
            user.set_password(password)
            user.save()
        # Once made, the demo account is the team's to change: demoted or given a new password, it stays so.
        self.stdout.write(f"  Demo login: demo / {password}   (admin; set BATCHSITE_DEMO_USER=0 to turn off)")
