"""Token budgets in the server's currency (issue 29): what a request is charged, and how an endpoint's own way of
counting is learned. The cluster tests (test_engine_cluster.py) run both counting rules against the simulator."""

import math
import time

import pytest

from jobs import tokens
from jobs.engine import ratelimit

CHAT = "/v1/chat/completions"


def test_a_request_is_charged_a_token_per_four_characters_of_prompt_and_its_whole_output_budget():
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "abcd"}, {"role": "user", "content": "Hello world"}],
    }
    assert tokens.rate_charge(CHAT, body) == math.ceil(len("abcd\nHello world") / 4)
    assert tokens.rate_charge(CHAT, {**body, "max_tokens": 100}) == 4 + 100
    assert tokens.rate_charge(CHAT, {**body, "max_completion_tokens": 100, "n": 3}) == 4 + 300
    parts = {
        "role": "user",
        "content": [{"type": "text", "text": "x" * 40}, {"type": "image_url", "image_url": {"url": "u"}}],
    }
    assert tokens.rate_charge(CHAT, {"messages": [parts]}) == 11  # an image part weighs nothing but its joining newline
    assert tokens.rate_charge("/v1/embeddings", {"input": "y" * 41, "max_tokens": 50}) == 11  # no output
    assert tokens.rate_charge("/v1/completions", {"prompt": "z" * 8, "max_tokens": 7, "best_of": 2}) == 2 + 14
    responses = {"input": "q" * 12, "instructions": "be brief", "max_output_tokens": 20}
    assert tokens.rate_charge("/v1/responses", responses) == math.ceil((12 + 1 + 8) / 4) + 20
    assert tokens.rate_charge(CHAT, {"messages": "not a list", "max_tokens": "lots"}) == 0  # junk weighs nothing


def limiter(tmp_path, **kwargs) -> ratelimit.Limiter:
    return ratelimit.Limiter("ep", rpm=None, tpm=600_000, store=ratelimit.FileStore(tmp_path), **kwargs)


def test_a_429_that_states_what_it_needed_teaches_the_ratio_in_bounded_steps(tmp_path):
    paced = limiter(tmp_path)
    openai_429 = (
        "Rate limit reached for gpt-4o-mini in organization org-x on tokens per min (TPM): Limit 600000, "
        "Used 599000, Requested 1380. Please try again in 138ms."
    )
    paced.refused(openai_429, estimate=1200, cost=1200)
    assert paced.ratio == pytest.approx(1.15) and paced.charge(1000) == 1150
    paced.refused(openai_429.replace("1380", "12000"), estimate=1200, cost=1380)
    assert paced.ratio == pytest.approx(1.15 * ratelimit.RATIO_STEP)  # ten times: one step at a time
    paced.refused("Rate limit reached on requests per min (RPM): Limit 3000, Requested 1.", estimate=1200, cost=1)
    assert paced.ratio == pytest.approx(1.15 * ratelimit.RATIO_STEP)  # not about tokens: nothing learned
    paced.refused(openai_429.replace("1380", "600"), estimate=1200, cost=1380)
    assert paced.ratio == pytest.approx(1.15 * ratelimit.RATIO_STEP)  # refused for its timing: never down
    assert ratelimit.Limiter("x", None, None, store=ratelimit.FileStore(tmp_path), token_ratio=99).ratio == 4.0


def test_the_ratio_follows_the_drop_in_remaining_tokens(tmp_path, monkeypatch):
    """The endpoint charges 80% of our estimate: over each window its remaining tokens drop (plus what refilled)
    by 0.8x what every sender booked, and the ratio moves there."""
    clock = [1000.0]
    monkeypatch.setattr(ratelimit.time, "time", lambda: clock[0])
    paced = limiter(tmp_path)
    remaining = 300_000.0
    for _ in range(16):
        # A second of sends at our pace (10,000 of our tokens): each is 625 by our estimate, 500 by the endpoint's.
        sent = round(10_000 / paced.charge(625))
        for _ in range(sent):
            paced.reserve(paced.charge(625))
        clock[0] += 1.0
        remaining = min(600_000.0, remaining - 500 * sent + 10_000)  # what it charged, and a second's refill
        paced.observe({"x-ratelimit-limit-tokens": "600000", "x-ratelimit-remaining-tokens": str(int(remaining))})
    assert paced.ratio == pytest.approx(0.8 * ratelimit.MARGIN, abs=0.05)
    assert paced.learned.token_ratio == paced.ratio


def test_a_budget_that_stays_full_while_we_hold_back_lowers_the_ratio(tmp_path, monkeypatch):
    clock = [time.time()]
    monkeypatch.setattr(ratelimit.time, "time", lambda: clock[0])
    paced = limiter(tmp_path)
    full = {"x-ratelimit-limit-tokens": "600000", "x-ratelimit-remaining-tokens": "600000"}
    for _ in range(4):
        for _ in range(30):
            paced.reserve(1000)  # booked ahead of now: our own schedule holds the senders back
        clock[0] += 2.5
        paced.observe(full)
    assert paced.ratio < 1.0
