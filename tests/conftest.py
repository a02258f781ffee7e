import json
from pathlib import Path

import pytest


@pytest.fixture
def owner(django_user_model):
    return django_user_model.objects.create_user("owner", password="owner-pass-123")


@pytest.fixture
def teammate(django_user_model):
    return django_user_model.objects.create_user("teammate", password="teammate-pass-123")


@pytest.fixture
def write(tmp_path):
    """write("name.jsonl", text or bytes or list of objects) -> Path"""

    def _write(name: str, content) -> Path:
        path = tmp_path / name
        if isinstance(content, list):
            content = "".join(json.dumps(obj, ensure_ascii=False) + "\n" for obj in content)
        if isinstance(content, str):
            content = content.encode()
        path.write_bytes(content)
        return path

    return _write


def chat_line(custom_id: str, text: str = "Hello", model: str = "gpt-4o-mini", **body) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}], **body},
    }
