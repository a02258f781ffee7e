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
        made = []

        def new_password() -> str:
            made.append(True)
            return secrets.token_urlsafe(9)

        password = read_or_create(settings.DATA_DIR / "demo-password", new_password)
        user = get_user_model().objects.filter(username="demo").first()
        if user is None or made:
            user = user or get_user_model()(username="demo", email="demo@example.com")
            user.is_staff = user.is_superuser = True  # the demo's one person may do everything, prices too
            user.set_password(password)
            user.save()
        elif not (user.is_staff and user.is_superuser):  # made by an older version as staff only
            user.is_staff = user.is_superuser = True
            user.save(update_fields=["is_staff", "is_superuser"])
        self.stdout.write(f"  Demo login: demo / {password}   (admin; set BATCHSITE_DEMO_USER=0 to turn off)")
