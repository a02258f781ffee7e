"""Staff: the team's webhooks (each job's end is sent to every active one) and their delivery log."""

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from jobs import egress
from jobs.models import Webhook, WebhookDelivery
from jobs.web.decorators import staff_required
from jobs.web.requests import AuthenticatedHttpRequest


class WebhookForm(forms.ModelForm):
    class Meta:
        model = Webhook
        fields = ["name", "url"]
        help_texts = {"url": "Receives batch.completed, batch.failed and batch.cancelled as JSON, signed."}

    def clean_url(self) -> str:
        url = self.cleaned_data["url"]
        try:
            egress.check_webhook_url(url, must_resolve=True)
        except egress.UnsafeURL as e:
            raise ValidationError(str(e)) from None
        return url


@require_http_methods(["GET", "POST"])
@login_required
@staff_required
def webhooks(request: AuthenticatedHttpRequest) -> HttpResponse:
    form = WebhookForm(request.POST or None)
    created = None
    if request.method == "POST" and form.is_valid():
        hook = form.save(commit=False)
        secret = hook.new_secret()
        hook.save()
        created = {"hook": hook, "secret": secret}
        form = WebhookForm()
    context = {
        "form": form,
        "created": created,
        "hooks": Webhook.objects.order_by("-active", "name"),
        "deliveries": WebhookDelivery.objects.select_related("webhook", "event").order_by("-pk")[:50],
    }
    response = render(request, "jobs/webhooks.html", context)
    if created:  # the one page that shows the secret: keep it out of every cache
        response["Cache-Control"] = "no-store"
    return response


@require_POST
@login_required
@staff_required
def webhook_toggle(request: AuthenticatedHttpRequest, pk: int) -> HttpResponse:
    hook = get_object_or_404(Webhook, pk=pk)
    hook.active = not hook.active
    hook.save(update_fields=["active"])
    messages.success(request, f"“{hook.name}” is {'on' if hook.active else 'off'}.")
    return redirect("webhooks")
