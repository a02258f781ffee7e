"""The prompt template that turns a CSV row into a request: its fields, the `{{ column }}` placeholders,
its checks against the file's columns, and the request body it makes.

Kept apart from the CSV reading because the web form uses it too: the same limits, the same
placeholders, the same JSON schema rules.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

from jobs.ingest.jsonl import MAX_DEPTH, has_lone_surrogate, is_too_deep
from jobs.ingest.lines import Errors, short

# A prompt template is a few pages, not a book: longer ones are refused before they are rendered
# into every row.
MAX_PROMPT_CHARS = 200_000
MAX_SCHEMA_CHARS = 100_000
TEMPLATE_TEXTS = (
    ("system_prompt", "The system prompt", MAX_PROMPT_CHARS),
    ("user_prompt", "The user prompt", MAX_PROMPT_CHARS),
    ("json_schema", "The JSON schema", MAX_SCHEMA_CHARS),
)


@dataclass
class Template:
    """How a CSV row becomes a request: `{{ column }}` placeholders in the prompts, and parameters."""

    model: str = ""
    user_prompt: str = ""
    system_prompt: str = ""
    url: str = "/v1/chat/completions"
    temperature: float | None = None
    max_tokens: int | None = None
    json_schema: dict | str | None = None
    custom_id_column: str = ""
    input_column: str = ""  # embeddings: the column to embed
    extra: dict = field(default_factory=dict)  # more body parameters, sent as they are
    delimiter: str = ""  # empty: detected from the header line

    @classmethod
    def from_dict(cls, data: dict) -> Template:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def as_dict(self) -> dict:
        return asdict(self)


# {{ column }}: the name is everything between the braces, stripped. Written without lazy or
# overlapping repeats so that matching is linear: `\{\{\s*(.*?)\s*\}\}` took minutes on `{{` and a
# few thousand spaces.
PLACEHOLDER = re.compile(r"\{\{([^{}]*)\}\}")


def _placeholder_name(match: re.Match) -> str | None:
    name = match.group(1).strip()
    return None if "\n" in name else name  # a name never spans lines


def _render(text: str, cells: dict[str, str]) -> str:
    def fill(match: re.Match) -> str:
        name = _placeholder_name(match)
        return match.group(0) if name is None else cells.get(name, match.group(0))

    return PLACEHOLDER.sub(fill, text)


def rendered_bytes(text: str, uses: Counter[str], cell_bytes: dict[str, int]) -> int:
    """At most how many bytes `text` takes once filled in, found without filling it in: a cell used 10,000
    times costs 10,000 times its size, and a row can be refused before that much is ever made. `uses`
    counts the placeholders of `text` by name (placeholder_uses), `cell_bytes` the row's cells' UTF-8 sizes."""
    size = len(text.encode())
    for name, count in uses.items():
        if name in cell_bytes:
            size += count * cell_bytes[name]
    return size


def placeholder_uses(text: str) -> Counter[str]:
    """How many times each placeholder name appears in `text`."""
    return Counter(template_columns(text))


def template_columns(text: str) -> list[str]:
    names = (_placeholder_name(m) for m in PLACEHOLDER.finditer(text or ""))
    return [name for name in names if name is not None]


def check_template(template: Template, columns: list[str], errors: Errors) -> bool:
    ok = True

    def fail(code, message, param):
        nonlocal ok
        errors.add(None, code, message, param)
        ok = False

    if template.url not in ("/v1/chat/completions", "/v1/embeddings"):
        fail("invalid_url", "A CSV template makes chat completions or embeddings.", "url")
        return False
    if not template.model.strip():
        fail("missing_model", "Choose a model.", "model")
    too_long = False
    for param, label, limit in TEMPLATE_TEXTS:
        if isinstance(value := getattr(template, param), str) and len(value) > limit:
            fail("invalid_value", f"{label} is longer than {limit:,} characters.", param)
            too_long = True
    if too_long:
        return False  # not worth scanning for placeholders
    for param in ("model", "system_prompt", "user_prompt", "custom_id_column", "input_column"):
        if "\x00" in getattr(template, param):  # the job stores its template, and Postgres no NUL
            fail("invalid_value", "The template holds a NUL character.", param)
    known = ", ".join(columns)
    column_set = set(columns)
    if template.url == "/v1/embeddings":
        if not template.input_column:
            fail("missing_required_parameter", "Choose the column to embed.", "input_column")
        elif template.input_column not in column_set:
            fail("unknown_column", f"There is no column {template.input_column!r}. Columns: {known}.", "input_column")
    else:
        if not template.user_prompt.strip():
            fail("missing_required_parameter", "Write a user prompt.", "user_prompt")
        for param in ("system_prompt", "user_prompt"):
            for name in dict.fromkeys(template_columns(getattr(template, param))):
                if name not in column_set:
                    fail(
                        "unknown_column",
                        f"The template uses {{{{ {name[:100]} }}}}, but the file has no column {short(name)}. Columns: {known}.",
                        param,
                    )
    if template.custom_id_column and template.custom_id_column not in column_set:
        fail(
            "unknown_column", f"There is no column {template.custom_id_column!r}. Columns: {known}.", "custom_id_column"
        )
    if template.temperature is not None and not (0 <= template.temperature <= 2):
        fail("invalid_value", "Temperature must be between 0 and 2.", "temperature")
    if template.max_tokens is not None and template.max_tokens < 1:
        fail("invalid_value", "Max tokens must be a positive number.", "max_tokens")
    if template.json_schema is not None and template.json_schema not in ("", {}):
        try:
            schema_format(template.json_schema)
        except ValueError as e:
            fail("invalid_json_schema", str(e), "json_schema")
    if not isinstance(template.extra, dict):
        fail("invalid_type", "Extra parameters must be a JSON object.", "extra")
    return ok


def schema_format(schema: dict | str) -> dict:
    """A JSON schema (or a full json_schema block) -> the chat response_format that asks for it."""
    too_deep = ValueError(f"The JSON schema nests more than {MAX_DEPTH} levels deep.")
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ValueError(f"The JSON schema is not valid JSON: {e}.") from None
        except RecursionError:
            raise too_deep from None
    if is_too_deep(None, schema):
        raise too_deep
    if not isinstance(schema, dict):
        raise ValueError("The JSON schema must be a JSON object.")
    text = json.dumps(schema)
    if has_lone_surrogate(text, schema):
        raise ValueError("The JSON schema has a \\u escape of half a character (a lone UTF-16 surrogate).")
    if "\\u0000" in text:  # the job keeps its template as JSON, and Postgres's jsonb takes no NUL
        raise ValueError("The JSON schema holds a NUL character (\\u0000).")
    if "schema" in schema and isinstance(schema["schema"], dict):
        block = {"name": "output", **schema}
    else:
        block = {"name": "output", "strict": True, "schema": schema}
    return {"type": "json_schema", "json_schema": block}


def template_body_base(template: Template) -> dict:
    """The body every row's request shares: the model and the parameters, without the prompt."""
    body: dict = {"model": template.model.strip()}
    if template.url == "/v1/chat/completions":
        if template.temperature is not None:
            body["temperature"] = template.temperature
        if template.max_tokens:
            body["max_tokens"] = template.max_tokens
        if template.json_schema is not None and template.json_schema not in ("", {}):
            body["response_format"] = schema_format(template.json_schema)
    body.update(template.extra or {})
    return body
