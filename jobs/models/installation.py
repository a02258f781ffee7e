"""This installation's own key: what sets it apart from another one that shares its bucket (jobs/bucket.py)."""

from __future__ import annotations

import uuid

from django.db import IntegrityError, models, transaction


class Installation(models.Model):
    """One row. Its key names this installation's folder in a shared S3 bucket; "" for one that stored files
    there before the folder existed (the data migration), which keeps the bucket's old layout."""

    key = models.CharField(max_length=32, blank=True)

    def __str__(self) -> str:
        return self.key or "(the bucket's first layout)"

    @classmethod
    def own_key(cls) -> str:
        row = cls.objects.filter(pk=1).first()
        if row is None:
            try:
                with transaction.atomic():
                    row = cls.objects.create(pk=1, key=uuid.uuid4().hex[:12])
            except IntegrityError:  # another node made it first
                row = cls.objects.get(pk=1)
        return row.key
