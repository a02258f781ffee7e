from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from jobs.models import ApiToken


class Command(BaseCommand):
    help = "Create a personal API token for the OpenAI-compatible /v1 API; the token is the last line printed."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--create-user", action="store_true", help="create the user (no password) if missing")
        parser.add_argument("--name", default="Command line", help="a name to recognise the token by")

    def handle(self, *args, **options):
        User = get_user_model()
        username = options["username"]
        user = User.objects.filter(username=username).first()
        if user is None:
            if not options["create_user"]:
                raise CommandError(f"No user {username!r}. Add --create-user to create one.")
            user = User.objects.create_user(username)  # no usable password: the token is its only way in
            self.stderr.write(f"Created user {username!r} (no password; set one with `manage.py changepassword`).")
        token, plaintext = ApiToken.create_for(user, options["name"])
        self.stderr.write(
            f"API token “{token.name}” for {username}; it is shown only now. Revoke it on /account/tokens/."
        )
        self.stdout.write(plaintext)
