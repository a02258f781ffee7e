from decimal import Decimal

from django.db import migrations

# USD per million tokens (input, cached input, output), OpenAI's list prices for live requests.
# Edit them in the admin; add rows for your own models (vLLM/Ollama: leave them out, cost 0).
PRICES = [
    ("gpt-5", "1.25", "0.125", "10.00"),
    ("gpt-5-mini", "0.25", "0.025", "2.00"),
    ("gpt-5-nano", "0.05", "0.005", "0.40"),
    ("gpt-4.1", "2.00", "0.50", "8.00"),
    ("gpt-4.1-mini", "0.40", "0.10", "1.60"),
    ("gpt-4.1-nano", "0.10", "0.025", "0.40"),
    ("gpt-4o", "2.50", "1.25", "10.00"),
    ("gpt-4o-mini", "0.15", "0.075", "0.60"),
    ("o3", "2.00", "0.50", "8.00"),
    ("o4-mini", "1.10", "0.275", "4.40"),
    ("gpt-3.5-turbo", "0.50", None, "1.50"),
    ("text-embedding-3-small", "0.02", None, "0"),
    ("text-embedding-3-large", "0.13", None, "0"),
    ("text-embedding-ada-002", "0.10", None, "0"),
]


def add_prices(apps, schema_editor):
    Price = apps.get_model("jobs", "Price")
    for model, inp, cached, out in PRICES:
        Price.objects.get_or_create(
            model=model,
            defaults={
                "input_per_mtok": Decimal(inp),
                "cached_input_per_mtok": Decimal(cached) if cached else None,
                "output_per_mtok": Decimal(out),
            },
        )


class Migration(migrations.Migration):
    dependencies = [("jobs", "0002_engine")]
    operations = [migrations.RunPython(add_prices, migrations.RunPython.noop)]
