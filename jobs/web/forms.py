import json
from typing import Any

from django import forms
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import transaction
from django.utils import timezone

from jobs import egress, runoptions
from jobs.ingest import MAX_DEPTH, MAX_PROMPT_CHARS, MAX_SCHEMA_CHARS, RunOptions, Template, schema_format
from jobs.models import Endpoint, Job


class UploadForm(forms.Form):
    file = forms.FileField(help_text="OpenAI batch JSONL, or a CSV with a header row")


def _at_most(limit: int) -> dict:
    return {"max_length": f"This is too long: at most {limit:,} characters (it has %(show_value)s)."}


class JobForm(forms.Form):
    """Launch settings, and for CSV files the prompt template."""

    # Labels as the review page shows them: the Check panel lists refused fields by these names.
    name = forms.CharField(label="Job name", max_length=200, required=False)
    endpoint = forms.ModelChoiceField(queryset=Endpoint.objects.all(), required=False, empty_label=None)
    mode = forms.ChoiceField(choices=Job.Mode.choices, initial=Job.Mode.LIVE, required=False)
    # A browser's datetime-local input sends a time without a zone: it is read in the server's TIME_ZONE.
    deadline = forms.DateTimeField(
        label="Deadline",
        required=False,
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M"),
    )
    max_attempts = forms.IntegerField(
        min_value=runoptions.MAX_ATTEMPTS[0],
        max_value=runoptions.MAX_ATTEMPTS[1],
        initial=runoptions.DEFAULTS.max_attempts,
        help_text="Times a request is sent before it "
        "fails. A 429 rate limit never counts; server errors, timeouts and lost connections get at least 10 tries.",
    )
    output_retries = forms.IntegerField(
        label="Retries for invalid JSON",
        min_value=runoptions.OUTPUT_RETRIES[0],
        max_value=runoptions.OUTPUT_RETRIES[1],
        initial=runoptions.DEFAULTS.output_retries,
        required=False,
        help_text="When a request asks for a JSON schema, every answer is checked against it; one that is not "
        "valid JSON or breaks the schema is sent again this many times, then fails as invalid_output.",
    )
    cost_cap = forms.DecimalField(
        label="Cost cap ($)",
        required=False,
        min_value=0,
        max_digits=12,
        decimal_places=4,
        help_text="Optional. The job pauses before a request whose most possible cost (input plus all the output "
        "it may ask for) would take it past this; raise the cap and resume to go on.",
    )
    notify = forms.BooleanField(
        label="Email me when it ends",
        required=False,
        help_text="An email when the job completes, fails or is cancelled, or pauses by itself (your default is "
        "in your account settings). The team's webhooks are told either way.",
    )
    use_cache = forms.BooleanField(
        label="Reuse cached answers",
        required=False,
        help_text="A request answered before (same endpoint and exactly the same body) gets that answer again, "
        "free and at once; requests repeated in this file are sent once. Cached answers repeat themselves: "
        "at a temperature above 0 you get the same text, not a new sample.",
    )
    # CSV template
    url = forms.ChoiceField(
        choices=[("/v1/chat/completions", "Chat completions"), ("/v1/embeddings", "Embeddings")],
        initial="/v1/chat/completions",
        required=False,
        label="Request type",
    )
    model = forms.CharField(max_length=200, required=False)
    system_prompt = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3}),
        required=False,
        max_length=MAX_PROMPT_CHARS,
        error_messages=_at_most(MAX_PROMPT_CHARS),
    )
    user_prompt = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 5}),
        required=False,
        max_length=MAX_PROMPT_CHARS,
        error_messages=_at_most(MAX_PROMPT_CHARS),
    )
    input_column = forms.CharField(label="Text to embed", max_length=200, required=False)
    custom_id_column = forms.CharField(label="custom_id from", max_length=200, required=False)
    temperature = forms.FloatField(min_value=0, max_value=2, required=False)
    max_tokens = forms.IntegerField(min_value=1, max_value=1_000_000, required=False)
    json_schema = forms.CharField(
        label="JSON schema",
        widget=forms.Textarea(attrs={"rows": 4}),
        required=False,
        max_length=MAX_SCHEMA_CHARS,
        error_messages=_at_most(MAX_SCHEMA_CHARS),
    )

    def __init__(self, *args, csv_columns=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.csv_columns = csv_columns or []
        self.options: RunOptions | None = None  # read by clean() from a valid form
        if self.csv_columns:
            choices = [("", "(row number)")] + [(c, c) for c in self.csv_columns]
            self.fields["custom_id_column"].widget = forms.Select(choices=choices)
            self.fields["input_column"].widget = forms.Select(choices=[("", "(choose)")] + choices[1:])
        zone = timezone.get_current_timezone_name()
        self.fields["deadline"].help_text = f"Hybrid: every answer is in by then. In server time ({zone})."

    def clean_mode(self):
        return self.cleaned_data["mode"] or Job.Mode.LIVE

    def clean(self) -> dict[str, Any]:
        super().clean()
        data = self.cleaned_data
        if data.get("mode") != Job.Mode.HYBRID:
            self.errors.pop("deadline", None)  # ignored, even if it is not a date
            data["deadline"] = None
        if "deadline" not in self.errors:  # not a date: that error says enough
            try:
                self.options = runoptions.read(data)
            except runoptions.InvalidOption as e:
                self.add_error(e.option, str(e))
        return data

    def clean_json_schema(self):
        text = self.cleaned_data["json_schema"].strip()
        if text:
            try:
                value = json.loads(text)
            except ValueError as e:
                raise forms.ValidationError(f"Not valid JSON: {e}.") from None
            except RecursionError:
                raise forms.ValidationError(f"The schema nests more than {MAX_DEPTH} levels deep.") from None
            if not isinstance(value, dict):
                raise forms.ValidationError("The schema must be a JSON object.")
            try:
                schema_format(value)  # depth and lone surrogates, as validation will check them
            except ValueError as e:
                raise forms.ValidationError(str(e)) from None
        return text

    def run_options(self) -> RunOptions:
        """How the job runs, for either launch path (ingest.create_job, create_job_to_validate)."""
        assert self.options is not None  # the view asks a valid form only
        return self.options

    def template(self) -> Template:
        data = self.cleaned_data
        return Template(
            model=data.get("model") or "",
            user_prompt=data.get("user_prompt") or "",
            system_prompt=data.get("system_prompt") or "",
            url=data.get("url") or "/v1/chat/completions",
            temperature=data.get("temperature"),
            max_tokens=data.get("max_tokens"),
            json_schema=data.get("json_schema") or None,
            custom_id_column=data.get("custom_id_column") or "",
            input_column=data.get("input_column") or "",
        )


# An endpoint's Batch API settings (remote and hybrid jobs) have defaults that fit OpenAI: left empty, or not
# sent at all, they keep the default or the stored value.
BATCH_FIELDS = ["batch_max_requests", "batch_max_bytes", "batch_token_limit", "batch_discount", "batch_cancel_seconds"]


class EndpointForm(forms.ModelForm):
    api_key = forms.CharField(
        label="API key",
        required=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Sent as a Bearer token. Leave empty for servers that need none, like a local Ollama or vLLM.",
    )
    # Not the model field: its one-default constraint would reject the form before save() could
    # hand the role over from the current default.
    make_default = forms.BooleanField(
        label="Default endpoint",
        required=False,
        help_text="New jobs and /v1 batches run here unless they pick another.",
    )

    class Meta:
        model = Endpoint
        fields = ["name", "base_url", "concurrency", "rpm", "tpm", *BATCH_FIELDS]
        labels = {
            "base_url": "Base URL",
            "rpm": "Requests per minute",
            "tpm": "Tokens per minute",
            "batch_max_requests": "Requests per batch",
            "batch_max_bytes": "Bytes per batch file",
            "batch_token_limit": "Enqueued tokens per model",
            "batch_discount": "Discount",
            "batch_cancel_seconds": "Seconds a cancel may take",
        }
        help_texts = {
            "rpm": "Leave empty to learn it from the server's x-ratelimit-* headers.",
            "tpm": "Leave empty to learn it from the server's x-ratelimit-* headers.",
            "batch_max_requests": "A job is split into remote batches of at most this many requests (OpenAI: 50,000).",
            "batch_max_bytes": "And at most this many bytes of input file each (OpenAI: 200 MB, 209,715,200 bytes).",
            "batch_token_limit": "Input plus maximum output tokens one model may have queued at once (OpenAI's "
            "depends on the model and your tier). Empty: no limit; a batch refused for tokens lowers it.",
            "batch_discount": "The Batch API's price cut, for the cost of remote answers: 0.5 is half price.",
            "batch_cancel_seconds": "How long a cancelled batch may take to stop. Hybrid jobs switch to live this "
            "much before the deadline, until a cancel has been measured.",
        }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["make_default"].initial = self.instance.is_default
        if self.instance.api_key_encrypted:
            self.fields["api_key"].help_text = "Leave empty to keep the stored key."
        for name in BATCH_FIELDS:
            self.fields[name].required = False
        for name, low, high in [
            ("batch_max_requests", 1, None),
            ("batch_max_bytes", 1, None),
            ("batch_discount", 0, 1),
        ]:
            field = self.fields[name]
            field.validators.append(MinValueValidator(low))
            field.widget.attrs["min"] = low
            if high is not None:
                field.validators.append(MaxValueValidator(high))
                field.widget.attrs["max"] = high
        self.order_fields(["name", "base_url", "api_key", "concurrency", "rpm", "tpm", "make_default", *BATCH_FIELDS])

    def clean_base_url(self):
        url = self.cleaned_data["base_url"].strip()
        try:
            egress.check_base_url(url, must_resolve=True)
        except egress.UnsafeURL as e:
            raise forms.ValidationError(str(e)) from None
        return url

    def clean(self) -> dict[str, Any]:
        super().clean()
        data = self.cleaned_data
        for name in BATCH_FIELDS:
            if data.get(name) is None and name != "batch_token_limit":  # an empty token limit means none
                data[name] = getattr(self.instance, name)  # the default, or what is stored
        # The stored key goes only to the server it was entered for: else anyone who may edit endpoints
        # could point one at their own server, press "Test connection" and read the key there.
        old, new = self.instance.base_url, data.get("base_url")
        if (
            self.instance.api_key_encrypted
            and new
            and egress.origin(new) != egress.origin(old)
            and not data.get("api_key")
        ):
            self.add_error(
                "api_key",
                f"The server changed (it was {egress.origin(old)[1] or old}): enter the API key "
                "again. A stored key is only sent to the server it was entered for.",
            )
        return data

    def save(self, commit=True):
        endpoint = super().save(commit=False)
        if self.cleaned_data.get("api_key"):
            endpoint.set_api_key(self.cleaned_data["api_key"].strip())
        if commit:
            with transaction.atomic():
                if not self.cleaned_data["make_default"]:
                    endpoint.is_default = False
                endpoint.save()
                if self.cleaned_data["make_default"]:
                    endpoint.make_default()
        return endpoint


class CostCapForm(forms.Form):
    cost_cap = forms.DecimalField(required=False, min_value=0, max_digits=12, decimal_places=4)
