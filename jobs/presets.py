"""Ready-made templates for the common jobs, from the examples shipped in examples/."""

import functools
import json

from django.conf import settings

TITLES = {
    "summarise_articles": "Summarise",
    "review_sentiment": "Sentiment",
    "translate_snippets": "Translate",
    "classify_tickets": "Classify",
    "extract_invoices": "Extract to JSON",
    "embed_products": "Embed",
}


@functools.cache
def load() -> list[dict]:
    """[{"key", "title", "template" (JSON text for the form)}] in a stable order."""
    out = []
    for key, title in TITLES.items():
        path = settings.BASE_DIR / "examples" / f"{key}.template.json"
        if path.exists():
            data = json.loads(path.read_text())
            if isinstance(data.get("json_schema"), dict):
                data["json_schema"] = json.dumps(data["json_schema"], indent=2)
            out.append({"key": key, "title": title, "template": json.dumps(data)})
    return out
