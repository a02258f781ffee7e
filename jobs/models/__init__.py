"""The core's data: endpoints, jobs and their items, prices, API tokens, and the /v1 files and batches."""

from jobs.models.budget import Spending, SpendingLimit, month_start
from jobs.models.cache import CachedAnswer, cache_key
from jobs.models.endpoint import Endpoint
from jobs.models.files import Batch, File, _batch_id, _file_id
from jobs.models.installation import Installation
from jobs.models.item import Item, JobTick
from jobs.models.job import INLINE_ROWS, SUPPORTED_URLS, InvalidTransition, Job, QuotaExceeded
from jobs.models.notify import JobEvent, NotificationSettings, Webhook, WebhookDelivery
from jobs.models.price import Price
from jobs.models.remote import RemoteBatch
from jobs.models.token import ApiToken

__all__ = [
    "INLINE_ROWS",
    "QuotaExceeded",
    "SUPPORTED_URLS",
    "ApiToken",
    "Batch",
    "CachedAnswer",
    "Endpoint",
    "File",
    "Installation",
    "InvalidTransition",
    "Item",
    "Job",
    "JobEvent",
    "JobTick",
    "NotificationSettings",
    "Price",
    "RemoteBatch",
    "Spending",
    "SpendingLimit",
    "Webhook",
    "WebhookDelivery",
    "_batch_id",
    "cache_key",
    "month_start",
    "_file_id",
]
