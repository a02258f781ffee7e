"""The staff page where the team's accounts are created, reset and switched off (no admin needed)."""

import secrets

from django import forms
from django.contrib import messages
from django.contrib.auth import get_user_model, update_session_auth_hash
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Sum
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from jobs.web.decorators import staff_required
from jobs.web.requests import AuthenticatedHttpRequest

User = get_user_model()


class PersonForm(forms.ModelForm):
    class Meta:
        model = User
        fields = ["username", "email", "is_staff"]
        labels = {"is_staff": "Staff: may manage endpoints, the team, and everyone's jobs"}


def _new_password() -> str:
    return secrets.token_urlsafe(12)


def _render(request: AuthenticatedHttpRequest, form: PersonForm, shown: dict | None = None) -> HttpResponse:
    people = User.objects.annotate(n_jobs=Count("jobs"), cost=Sum("jobs__cost")).order_by("-is_active", "username")
    response = render(request, "jobs/team.html", {"people": people, "form": form, "shown": shown})
    if shown:  # the one page that shows a password: keep it out of every cache
        response["Cache-Control"] = "no-store"
    return response


@require_http_methods(["GET", "POST"])
@login_required
@staff_required
def team(request: AuthenticatedHttpRequest) -> HttpResponse:
    form = PersonForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        person = form.save(commit=False)
        password = _new_password()
        person.set_password(password)
        person.save()
        return _render(request, PersonForm(), {"person": person, "password": password, "created": True})
    return _render(request, form)


@require_POST
@login_required
@staff_required
def person_action(request: AuthenticatedHttpRequest, pk: int, action: str) -> HttpResponse:
    person = get_object_or_404(User, pk=pk)
    if person.is_superuser and not request.user.is_superuser:
        # Else staff could set an admin's password, sign in as them and, from the admin, do anything.
        raise PermissionDenied("Only an admin can change an admin's account.")
    if action == "reset":
        password = _new_password()
        person.set_password(password)
        person.save(update_fields=["password"])
        # Their signed-in sessions end with the old password (Django checks a hash of it on every
        # request); keep the session of staff who reset their own. API tokens keep working: a reset is
        # how a forgotten password is replaced, and scripts should not break; switching off stops them.
        if person == request.user:
            update_session_auth_hash(request, person)
        return _render(request, PersonForm(), {"person": person, "password": password})
    if person == request.user:
        messages.error(request, "You cannot switch off or demote your own account.")
    elif action == "deactivate":
        User.objects.filter(pk=pk).update(is_active=False)
        messages.success(
            request, f"{person.username} can no longer sign in; their API tokens stop working. Their jobs stay."
        )
    elif action == "activate":
        User.objects.filter(pk=pk).update(is_active=True)
        messages.success(request, f"{person.username} can sign in again.")
    elif action in ("make-staff", "remove-staff"):
        User.objects.filter(pk=pk).update(is_staff=action == "make-staff")
        messages.success(request, f"{person.username} is {'now' if action == 'make-staff' else 'no longer'} staff.")
    else:
        messages.error(request, "Unknown action.")
    return redirect("team")
