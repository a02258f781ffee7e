from django.apps import AppConfig
from django.db.models.signals import post_migrate


class JobsConfig(AppConfig):
    name = "jobs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from django_q.signals import post_spawn

        # Once per migrate (sender: this app), after every app's migrations, django_q's included.
        post_migrate.connect(_register_schedules, sender=self, dispatch_uid="batchsite-schedules")
        post_spawn.connect(_watch, dispatch_uid="batchsite-watch")


# jobs.engine.tasks is imported late: it pulls in the engine (openai, httpx), which the web processes need not load.
def _register_schedules(sender, using, apps=None, **kwargs):
    from django.apps import apps as global_apps

    from jobs.engine import tasks

    tasks.ensure_schedules(apps or global_apps, using)  # `flush` sends no `apps`: the models are all there


def _watch(sender, **kwargs):
    from jobs.engine import shutdown, tasks

    shutdown.install_in_worker()
    tasks.watch()
