from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.db.models import Q
from django_q.admin import ScheduleAdmin
from django_q.models import Schedule

from jobs.models import ApiToken, Batch, CachedAnswer, Endpoint, Job, Price, RemoteBatch


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


# A django-q schedule names any importable function with any arguments: whoever can edit one runs code
# on the server. Batchsite makes its own schedules in code (tasks.ensure_schedules), so the admin only
# shows them.
admin.site.unregister(Schedule)


@admin.register(Schedule)
class ReadOnlyScheduleAdmin(ReadOnlyAdmin, ScheduleAdmin):
    pass


@admin.register(Endpoint)
class EndpointAdmin(ReadOnlyAdmin):
    """Read-only: endpoints are edited on the Endpoints page, whose form checks the URL and asks for the key
    again when the server changes."""

    list_display = ("name", "base_url", "masked_key", "concurrency", "rpm", "tpm", "is_default")
    readonly_fields = ("masked_key", "learned_rpm", "learned_tpm", "learned_token_ratio", "cooldown_until")


@admin.register(CachedAnswer)
class CachedAnswerAdmin(ReadOnlyAdmin):
    """The answer cache: staff may look and delete (one answer, or all from the Endpoints page)."""

    list_display = ("url", "model", "endpoint", "answered_at", "hits", "last_hit_at", "cost")
    list_filter = ("endpoint", "model")
    search_fields = ("key", "model")


def _first(job: Job) -> str:
    if job.status in Job.ACTIVE:
        return "cancel or pause it first"
    return "its batches still run at the endpoint: cancel it first"


class RefuseActiveJobs(admin.ModelAdmin):
    """The admin's delete pages (one object or the bulk action, for jobs and for users, whose jobs go with
    them) keep the dashboard's rule: a job whose slices may be sending requests is cancelled or paused
    first (Job.deletable). Its active jobs are listed as protected, so the page says why."""

    def get_deleted_objects(self, objs, request):
        deletable, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        at_endpoint = Q(pk__in=RemoteBatch.objects.filter(collected_at__isnull=True).values("job_id"))
        jobs = Job.objects.filter(Q(status__in=Job.ACTIVE) | at_endpoint)
        if self.model is Job:
            jobs = jobs.filter(pk__in=[o.pk for o in objs])
        else:
            jobs = jobs.filter(owner__in=[o.pk for o in objs])
        protected = [*protected, *(f"{job} ({job.status}: {_first(job)})" for job in jobs)]
        return deletable, counts, perms_needed, protected


User = get_user_model()
if admin.site.is_registered(User):
    admin.site.unregister(User)


@admin.register(User)
class TeamUserAdmin(RefuseActiveJobs, UserAdmin):
    pass


@admin.register(Job)
class JobAdmin(RefuseActiveJobs):
    list_display = ("name", "owner", "status", "total", "n_succeeded", "n_failed", "created_at")
    list_filter = ("status", "mode")
    search_fields = ("name",)
    readonly_fields = [f.name for f in Job._meta.fields if f.name not in ("name",)]


@admin.register(Price)
class PriceAdmin(admin.ModelAdmin):
    list_display = ("model", "input_per_mtok", "cached_input_per_mtok", "output_per_mtok")
    list_editable = ("input_per_mtok", "cached_input_per_mtok", "output_per_mtok")
    search_fields = ("model",)


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("name", "user", "prefix", "created_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("name", "user__username", "prefix")
    readonly_fields = ("user", "name", "prefix", "token_hash", "created_at", "last_used_at")
    actions = ["revoke"]

    @admin.action(description="Revoke selected tokens")
    def revoke(self, request, queryset):
        for token in queryset:
            token.revoke()


@admin.register(Batch)
class BatchAdmin(admin.ModelAdmin):
    list_display = ("public_id", "job", "input_file", "completion_window")
    search_fields = ("public_id",)
    readonly_fields = ("public_id", "job", "input_file", "completion_window", "cancelling_at")
