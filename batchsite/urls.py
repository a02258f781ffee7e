from django.contrib import admin
from django.urls import include, path

from jobs.web import account

urlpatterns = [
    path("admin/", admin.site.urls),
    path("v1/", include("jobs.api.urls")),
    path("account/tokens/", account.tokens, name="api_tokens"),
    path("account/notifications/", account.notification_settings, name="notification_settings"),
    path("", include("jobs.web.urls")),
]
