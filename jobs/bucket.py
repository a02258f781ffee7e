"""The S3 storage of uploads when BATCHSITE_S3_PREFIX is not set (settings.STORAGES names it): each installation
under a folder of its own in the bucket. Loaded only where a bucket is configured, so django-storages stays
optional. Not in jobs/storage.py: the folder's name comes from the database (Installation), and storage sits
below the models, which use it.
"""

from __future__ import annotations

from storages.backends.s3 import S3Storage

from jobs.models import Installation


class InstallationS3Storage(S3Storage):
    """S3Storage under a folder of this installation's own (Installation.own_key) inside the configured prefix:
    two installations sharing a bucket with the default prefix would each sweep away the other's uploads
    (remove_stale_uploads keeps only what its own database knows)."""

    _base = "batchsite"
    _own: str | None = None

    @property
    def location(self) -> str:
        if self._own is None:
            key = Installation.own_key()
            self._own = f"{self._base}/{key}" if key else self._base
        return self._own

    @location.setter
    def location(self, value: str) -> None:
        self._base, self._own = value, None
