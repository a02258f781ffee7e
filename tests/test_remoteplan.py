"""The pure rules of remote and hybrid jobs: cutting a job into batches, and the hybrid switch time."""

from datetime import UTC, datetime, timedelta

import pytest

from jobs import remoteplan
from jobs.remoteplan import Limits, Request, split, switch_time

DEADLINE = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "remaining, rate, cancel, margin, switch_before_deadline",
    [
        (0, 10.0, 600, 60, 660),  # nothing left: only the cancel and the margin
        (1000, 10.0, 600, 60, 760),  # 100 s live
        (1000, 10.0, 0, 0, 100),
        (36_000, 10.0, 600, 60, 4260),  # an hour live
        (36_000, 100.0, 600, 60, 1020),  # ten times the rate, a tenth of the live time
        (5, 0.5, 1, 1, 12),  # slow endpoint: 10 s live
        (1000, 10.0, 3600, 60, 3760),  # a slow cancel moves the switch earlier by as much
    ],
)
def test_switch_time_is_the_deadline_less_cancel_live_run_and_margin(
    remaining, rate, cancel, margin, switch_before_deadline
):
    plan = switch_time(DEADLINE, remaining, rate, cancel, margin)

    assert plan.at == DEADLINE - timedelta(seconds=switch_before_deadline)
    assert plan.live_seconds == pytest.approx(remaining / rate)
    assert f"{remaining:,} requests left" in plan.reason


def test_an_unknown_rate_never_switches_early():
    plan = switch_time(DEADLINE, 100, 0.0, 600, 60)

    assert plan.at == DEADLINE and "not known" in plan.reason


@pytest.mark.parametrize(
    "concurrency, rpm, tpm, tokens, latency, rate, bound",
    [
        (100, None, None, 0, None, 20.0, "in flight"),  # 100 at the assumed 5 s each
        (100, 600, None, 0, None, 10.0, "requests/min"),
        (100, 6000, 60_000, 100, None, 10.0, "tokens/min"),
        (10, 6000, None, 0, 0.5, 20.0, "in flight"),
    ],
)
def test_live_rate_is_the_tightest_bound(concurrency, rpm, tpm, tokens, latency, rate, bound):
    got, why = remoteplan.live_rate(concurrency, rpm, tpm, tokens, latency)

    assert got == pytest.approx(rate) and bound in why


def test_margin_is_a_fifth_of_the_live_run_with_a_floor():
    assert remoteplan.margin_for(10, 60) == 60
    assert remoteplan.margin_for(1000, 60) == 200


def requests(*models, size=100, tokens=10):
    return [Request(i, model, size, tokens) for i, model in enumerate(models)]


def ids(chunks):
    return [[r.id for r in chunk] for chunk in chunks]


@pytest.mark.parametrize(
    "limits, expected",
    [
        (Limits(requests=2), [[0, 1], [2, 3], [4]]),
        (Limits(bytes=250), [[0, 1], [2, 3], [4]]),  # 100 bytes each
        (Limits(tokens=30), [[0, 1, 2], [3, 4]]),  # 10 tokens each
        (Limits(), [[0, 1, 2, 3, 4]]),
    ],
)
def test_split_keeps_each_chunk_within_every_limit(limits, expected):
    assert ids(split(requests(*"aaaaa"), limits)) == expected


def test_openai_limits_are_the_defaults_and_50_001_requests_make_two_batches():
    assert Limits().requests == 50_000 and Limits().bytes == 200 * 1024 * 1024

    chunks = list(split(requests(*"a" * 50_001), Limits()))

    assert [len(chunk) for chunk in chunks] == [50_000, 1]


def test_split_puts_one_model_in_each_chunk_in_input_order():
    chunks = list(split(requests("a", "b", "a", "b", "a"), Limits(requests=2)))

    assert sorted(ids(chunks)) == [[0, 2], [1, 3], [4]]  # full chunks as they fill, then the open ones
    assert all(len({r.model for r in chunk}) == 1 for chunk in chunks)


def test_a_request_over_a_limit_alone_gets_a_chunk_of_its_own():
    big = [Request(0, "a", 100, 10), Request(1, "a", 100, 500), Request(2, "a", 100, 10)]

    assert ids(split(big, Limits(tokens=100))) == [[0], [1], [2]]


@pytest.mark.parametrize(
    "body, est, tokens",
    [
        ({"max_tokens": 100}, 20, 120),
        ({"max_completion_tokens": 50, "max_tokens": 100}, 20, 70),  # the newer name wins
        ({"max_output_tokens": 30}, 20, 50),  # the Responses API
        ({"max_tokens": 10, "n": 3}, 5, 35),  # every choice may be that long
        ({}, 20, 20),
        ({"max_tokens": True}, 20, 20),  # not a number
    ],
)
def test_request_tokens_counts_input_and_the_most_it_may_generate(body, est, tokens):
    assert remoteplan.request_tokens(body, est) == tokens
