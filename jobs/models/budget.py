"""Monthly spending limits (issue 14), set by staff per person and per endpoint: a job that would take either
past its limit pauses before that request (jobs/engine/leases.py). A month's spending is the cost of the jobs
created in it, as the Usage page counts it."""

from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Sum
from django.utils import timezone


def month_start(now=None):
    local = timezone.localtime(now or timezone.now())
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

    def jobs(self):
        from jobs.models.job import Job

        if self.user_id:
            return Job.objects.filter(created_at__gte=month_start(), owner_id=self.user_id)
        return Job.objects.filter(created_at__gte=month_start(), endpoint=self.endpoint)

    def spent(self) -> Decimal:
        return self.jobs().aggregate(s=Sum("cost"))["s"] or Decimal(0)
