"""What checking structured answers costs: jobs.engine.schemacheck.problem() per chat answer, against the floor of
parsing the same answer texts with json.loads.

The answers are the simulator's (simulator.answers.answer), to a chat request whose response_format is a typical
strict JSON schema: 8 required properties (strings, a number, an integer, an enum, a boolean, an array of three
small objects), no additional properties; every prompt differs, so every answer text does. Each measure is the
best of 5 passes over all answers, after one warm-up pass (the validator is compiled once, then cached).

    .venv/bin/python bench/schema.py [ANSWERS]     (default 20,000; no Django needed)

Prints µs per answer for json.loads alone, for problem() on valid answers and on a mix with half of them broken
(the simulator's bad_output_rate=0.5), for wanted() (once per request), and problem()'s ratio to json.loads.
Target: problem() <= 200 µs per answer.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from jobs.engine.schemacheck import problem, wanted
from simulator import SimConfig
from simulator.answers import BadOutputs, answer

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
TARGET_US = 200
URL = "https://api.openai.com/v1/chat/completions"
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "summary": {"type": "string"},
        "language": {"type": "string"},
        "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "resolved": {"type": "boolean"},
        "topics": {
            "type": "array",
            "minItems": 3,
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "weight": {"type": "number"}},
                "required": ["name", "weight"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["title", "summary", "language", "sentiment", "confidence", "rating", "resolved", "topics"],
    "additionalProperties": False,
}
BODY = {
    "model": "gpt-4o-mini",
    "response_format": {"type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMA, "strict": True}},
}


def responses(n: int, bad_output_rate: float) -> list[dict]:
    bad = BadOutputs(SimConfig(bad_output_rate=bad_output_rate, seed=1))
    out = []
    for i in range(n):
        prompt = f"Review #{i}: the blender arrived two days late and the lid cracked, but support replaced it."
        status, data = answer("chat", {**BODY, "messages": [{"role": "user", "content": prompt}]}, bad)
        assert status == 200, data
        out.append(data)
    return out


def per_answer_us(fn, items: list) -> float:
    """Best of 5 passes over `items`, after a warm-up pass: µs per item."""
    for item in items:
        fn(item)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return best / len(items) * 1e6


def main() -> None:
    valid = responses(N, 0.0)
    mixed = responses(N, 0.5)
    want = wanted(URL, BODY)
    assert want is not None
    assert not any(problem(want, URL, d) for d in valid[:100])  # the check passes what it should
    broken = sum(1 for d in mixed if problem(want, URL, d))
    texts = [d["choices"][0]["message"]["content"] for d in valid]

    loads = per_answer_us(json.loads, texts)
    check = per_answer_us(lambda d: problem(want, URL, d), valid)
    check_mixed = per_answer_us(lambda d: problem(want, URL, d), mixed)
    want_us = per_answer_us(lambda b: wanted(URL, b), [BODY] * min(N, 5_000))

    size = sum(len(t) for t in texts) / len(texts)
    print(f"{N:,} chat answers, {size:.0f} characters each on average; schema: 8 required properties")
    rows = [
        ("json.loads (floor)", loads, "answer"),
        ("problem(), valid answers", check, "answer"),
        (f"problem(), {broken / N:.0%} broken", check_mixed, "answer"),
        ("wanted(), once per request", want_us, "request"),
    ]
    for label, us, per in rows:
        ratio = f"{us / loads:5.1f}x json.loads" if label.startswith("problem") else ""
        print(f"{label:<28} {us:7.1f} µs/{per:<8} {ratio}".rstrip())
    worst = max(check, check_mixed)
    print(f"target: problem() <= {TARGET_US} µs/answer: {'met' if worst <= TARGET_US else 'MISSED'} ({worst:.1f} µs)")


if __name__ == "__main__":
    main()
