import json
import sys
import time
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db.models import Count

from jobs import export, ingest
from jobs.models import Endpoint, Item, Job, QuotaExceeded


class Command(BaseCommand):
    help = "Validate a JSONL (or CSV + template) file, run it as a job, and optionally wait and write the results."

    def add_arguments(self, parser):
        parser.add_argument("file")
        parser.add_argument("--template", help="CSV only: a JSON file with the prompt template (see examples/)")
        parser.add_argument("--user", default="demo", help="owner of the job (default: demo)")
        parser.add_argument("--name", default="")
        parser.add_argument("--wait", action="store_true", help="show progress until the job finishes")
        parser.add_argument("--output", help="with --wait: write results.jsonl, errors.jsonl and results.csv here")

    def handle(self, *args, **options):
        path = Path(options["file"])
        if not path.exists():
            raise CommandError(f"{path} does not exist.")
        owner = get_user_model().objects.filter(username=options["user"]).first()
        if owner is None:
            raise CommandError(f"No user {options['user']!r}. Create one, or run `make run` once for the demo user.")
        template = None
        fmt = ingest.detect_format(path.name, path)
        if fmt == Job.Format.CSV:
            if not options["template"]:
                raise CommandError("A CSV file needs --template TEMPLATE.json.")
            template = ingest.Template.from_dict(json.loads(Path(options["template"]).read_text()))
        plan = ingest.validate(path, format=fmt, template=template)
        if not plan.ok:
            for error in plan.errors:
                where = f"line {error.line}: " if error.line and f"Line {error.line}" not in error.message else ""
                self.stderr.write(f"{path}: {where}{error.message} [{error.code}]")
            if plan.error_count > len(plan.errors):
                self.stderr.write(f"... and {plan.error_count - len(plan.errors)} more errors.")
            raise CommandError(f"{plan.error_count} errors; nothing was created.")
        endpoint = Endpoint.default()
        if endpoint is None:
            raise CommandError("No endpoint: set OPENAI_API_KEY (and OPENAI_BASE_URL) or add one in the admin.")
        try:
            job = ingest.create_job(plan, owner=owner, name=options["name"], endpoint=endpoint)
        except QuotaExceeded as e:
            raise CommandError(str(e)) from None
        job.start()
        self.stdout.write(
            f"Job {job.pk} '{job.name}': {job.total:,} requests to {endpoint.base_url}{job.url.removeprefix('/v1')}"
        )
        if not options["wait"]:
            return
        shown = None
        while True:
            job.refresh_from_db()
            state = (job.n_done, job.status)
            if state != shown:  # on a terminal the bar redraws in place; in a log, a line per change
                shown = state
                bar = "#" * int(job.progress() / 2.5)
                end = "" if sys.stdout.isatty() else "\n"
                sys.stdout.write(f"\r  [{bar:<40}] {job.n_answered:,}/{job.total:,} {job.status:<10}{end}")
                sys.stdout.flush()
            if job.is_finished or job.status == Job.Status.PAUSED:
                break
            time.sleep(0.5)
        self.stdout.write("")
        if job.status_reason:
            self.stdout.write(job.status_reason)
        self.stdout.write(
            f"  {job.n_succeeded:,} succeeded, {job.n_failed:,} failed; {job.prompt_tokens + job.completion_tokens:,} tokens, ${job.cost:.4f}"
        )
        again = job.items.filter(attempts__gt=1).count()
        if again:
            self.stdout.write(f"  {again:,} sent more than once (answers that broke their JSON schema, server errors)")
        kinds = job.items.filter(status=Item.Status.FAILED).values("error_code").annotate(n=Count("id")).order_by("-n")
        if job.n_failed:
            self.stdout.write("  failed: " + ", ".join(f"{k['n']:,} {k['error_code'] or 'error'}" for k in kinds[:5]))
        if options["output"]:
            out = Path(options["output"])
            out.mkdir(parents=True, exist_ok=True)
            for name, writer in (
                ("results.jsonl", export.results_jsonl),
                ("errors.jsonl", export.errors_jsonl),
                ("results.csv", export.results_csv),
            ):
                with open(out / name, "w", encoding="utf-8", newline="") as f:
                    for chunk in writer(job):
                        f.write(chunk)
            self.stdout.write(f"  Wrote {out}/results.jsonl, errors.jsonl, results.csv")
