"""The page where each person creates and revokes their personal API tokens."""

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from jobs.models import ApiToken
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
