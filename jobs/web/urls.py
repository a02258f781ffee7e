from django.contrib.auth import views as auth_views
from django.contrib.messages.views import SuccessMessageMixin
from django.urls import path

from jobs.web import endpoints, hooks, items, job_actions, launch, ops, team, usage, views


class PasswordChangeView(SuccessMessageMixin, auth_views.PasswordChangeView):
    """Django's view redirects without a word; this one says the change worked."""

    template_name = "registration/password_change.html"
    success_url = "/"
    success_message = "Your password was changed."


urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", ops.healthz, name="healthz"),
    path("metrics", ops.metrics, name="metrics"),
    path("login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("account/password/", PasswordChangeView.as_view(), name="password_change"),
    path("jobs/new/", launch.job_new, name="job_new"),
    path("jobs/new/<str:token>/", launch.job_review, name="job_review"),
    path("jobs/new/<str:token>/check", launch.job_review_check, name="job_review_check"),
    path("jobs/<int:pk>/", views.job_detail, name="job_detail"),
    path("jobs/<int:pk>/progress", views.job_progress, name="job_progress"),
    path("jobs/<int:pk>/items/", items.item_list, name="item_list"),
    path("jobs/<int:pk>/items/<int:item_pk>/", items.item_detail, name="item_detail"),
    path("jobs/<int:pk>/download/<str:kind>", views.download, name="download"),
    path("jobs/<int:pk>/pause", job_actions.job_pause, name="job_pause"),
    path("jobs/<int:pk>/resume", job_actions.job_resume, name="job_resume"),
    path("jobs/<int:pk>/cancel", job_actions.job_cancel, name="job_cancel"),
    path("jobs/<int:pk>/retry", job_actions.job_retry, name="job_retry"),
    path("jobs/<int:pk>/cost-cap", job_actions.job_cost_cap, name="job_cost_cap"),
    path("jobs/<int:pk>/duplicate", job_actions.job_duplicate, name="job_duplicate"),
    path("jobs/<int:pk>/delete", job_actions.job_delete, name="job_delete"),
    path("endpoints/", endpoints.endpoint_list, name="endpoint_list"),
    path("endpoints/new/", endpoints.endpoint_edit, name="endpoint_new"),
    path("endpoints/<int:pk>/", endpoints.endpoint_edit, name="endpoint_edit"),
    path("endpoints/<int:pk>/test", endpoints.endpoint_test, name="endpoint_test"),
    path("endpoints/cache/clear", endpoints.cache_clear, name="cache_clear"),
    path("usage/", usage.usage, name="usage"),
    path("usage/limits", usage.spending_limit, name="spending_limit"),
    path("team/", team.team, name="team"),
    path("team/webhooks/", hooks.webhooks, name="webhooks"),
    path("team/webhooks/<int:pk>/toggle", hooks.webhook_toggle, name="webhook_toggle"),
    path("team/<int:pk>/<str:action>", team.person_action, name="person_action"),
]
