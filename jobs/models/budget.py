"""Monthly spending limits (issue 14), set by staff per person and per endpoint: a job that would take either
past its limit pauses before that request (jobs/engine/leases.py).

A month's spending is read from the spending table (Spending), written as results are: what requests cost counts in the
month their answers came, whenever their job was created, and stays counted when the job is deleted (a row
outlives its job). Job.cost can go down (a recount); the spending table never does."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import F, QuerySet, Sum
from django.utils import timezone

from jobs import clock
from jobs.models.job import Job


def month_start(now: datetime | None = None) -> datetime:
    local = timezone.localtime(now or clock.now())
    return local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


class SpendingLimit(models.Model):
    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="spending_limit"
    )
    endpoint = models.OneToOneField(
        "jobs.Endpoint", null=True, blank=True, on_delete=models.CASCADE, related_name="spending_limit"
    )
    monthly_usd = models.DecimalField(max_digits=12, decimal_places=2)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=models.Q(user__isnull=False, endpoint__isnull=True)
                | models.Q(user__isnull=True, endpoint__isnull=False),
                name="limit_of_one_user_or_one_endpoint",
            )
        ]

    def __str__(self) -> str:
        return f"${self.monthly_usd} a month for {self.user or self.endpoint}"

    @property
    def label(self) -> str:
        return f"{self.user.get_username()}'s" if self.user else f"the endpoint “{self.endpoint}”'s"

    def jobs(self) -> QuerySet[Job]:
        """The jobs whose requests in flight count against this limit: all of the person's, or the endpoint's."""
        if self.user_id:
            return Job.objects.filter(owner_id=self.user_id)
        return Job.objects.filter(endpoint=self.endpoint)

    def lock(self) -> None:
        """Hold this limit's row until the transaction ends (Postgres; SQLite's write lock covers it): claims of
        two jobs against one limit then weigh it one after the other, each seeing what the other committed."""
        SpendingLimit.objects.select_for_update().filter(pk=self.pk).values_list("pk", flat=True).first()

    def spent(self) -> Decimal:
        """This month's spending."""
        mine = Spending.objects.filter(month=month_start().date())
        mine = mine.filter(owner_id=self.user_id) if self.user_id else mine.filter(endpoint=self.endpoint)
        return mine.aggregate(s=Sum("usd"))["s"] or Decimal(0)


class Spending(models.Model):
    """What a job's requests cost in one month, added to as their results are written (the ledger,
    jobs/models/ledger.py). Its owner and endpoint are kept on the row, so it still counts once the job is deleted."""

    job = models.ForeignKey("jobs.Job", null=True, on_delete=models.SET_NULL, related_name="+")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    endpoint = models.ForeignKey("jobs.Endpoint", null=True, on_delete=models.SET_NULL, related_name="+")
    month = models.DateField()
    usd = models.DecimalField(max_digits=16, decimal_places=8, default=Decimal(0))

    class Meta:
        constraints = [models.UniqueConstraint(fields=["job", "month"], name="one_spending_row_per_job_and_month")]
        indexes = [models.Index(fields=["owner", "month"]), models.Index(fields=["endpoint", "month"])]

    def __str__(self) -> str:
        return f"${self.usd} in {self.month:%Y-%m} (job {self.job_id})"

    @classmethod
    def record(cls, job_id: int, usd: Decimal) -> None:
        """Add `usd` to the job's row of this month. Called under the job's lock (Job.lock), as every writer of
        results holds it, so the row is made once."""
        month = month_start().date()
        if cls.objects.filter(job_id=job_id, month=month).update(usd=F("usd") + usd):
            return
        owner_id, endpoint_id = Job.objects.filter(pk=job_id).values_list("owner_id", "endpoint_id").first() or (
            None,
            None,
        )
        if owner_id is None and endpoint_id is None:
            return  # the job is gone
        cls.objects.create(job_id=job_id, owner_id=owner_id, endpoint_id=endpoint_id, month=month, usd=usd)
