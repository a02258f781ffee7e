"""The page where each person creates and revokes their personal API tokens."""

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from jobs.models import ApiToken, NotificationSettings
from jobs.web.requests import AuthenticatedHttpRequest


class TokenForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="What uses it, e.g. “nightly eval script”.")


@require_http_methods(["GET", "POST"])
@login_required
def tokens(request: AuthenticatedHttpRequest) -> HttpResponse:
    action = request.POST.get("action")
    form = TokenForm(request.POST if action == "create" else None)
    created = None
    if action == "revoke":
        token = _own_token(request, request.POST.get("token", ""))
        token.revoke()
        messages.success(request, f"Revoked “{token.name}”. Requests with it now get 401.")
        return redirect("api_tokens")
    if action == "create" and form.is_valid():
        token, plaintext = ApiToken.create_for(request.user, form.cleaned_data["name"])
        created = {"token": token, "plaintext": plaintext}
        form = TokenForm()
    context = {
        "tokens": request.user.api_tokens.all(),
        "form": form,
        "created": created,
        "base_url": request.build_absolute_uri("/v1"),
    }
    response = render(request, "jobs/tokens.html", context)
    if created:  # the one page that shows the token: keep it out of every cache
        response["Cache-Control"] = "no-store"
    return response


def _own_token(request: AuthenticatedHttpRequest, pk: str) -> ApiToken:
    token = ApiToken.objects.filter(pk=int(pk), user=request.user).first() if pk.isascii() and pk.isdigit() else None
    if token is None:
        raise Http404("No such token.")
    return token


class NotificationForm(forms.Form):
    email = forms.EmailField(required=False, help_text="Where the emails about your jobs go.")
    email_when_done = forms.BooleanField(
        required=False,
        label="Email me when my jobs end",
        help_text="The default of “Email me when it ends” on the launch form, and for your /v1 batches "
        "(metadata batchsite_notify overrides it).",
    )


@require_http_methods(["GET", "POST"])
@login_required
def notification_settings(request: AuthenticatedHttpRequest) -> HttpResponse:
    prefs, _ = NotificationSettings.objects.get_or_create(user=request.user)
    initial = {"email": request.user.email, "email_when_done": prefs.email_when_done}
    form = NotificationForm(request.POST or None, initial=initial)
    if request.method == "POST" and form.is_valid():
        request.user.email = form.cleaned_data["email"]
        request.user.save(update_fields=["email"])
        prefs.email_when_done = form.cleaned_data["email_when_done"]
        prefs.save(update_fields=["email_when_done"])
        messages.success(request, "Saved your notification settings.")
        return redirect("notification_settings")
    return render(request, "jobs/notifications.html", {"form": form})
