"""How a job runs, read the same way for both launch paths: the review form (whose fields have parsed the
browser's input) and a /v1 batch (whose metadata gives strings). The rules, bounds and defaults are here once."""

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from django.utils import timezone

from jobs.ingest import RunOptions
from jobs.models import Job

MAX_ATTEMPTS = (1, 20)
OUTPUT_RETRIES = (0, 10)
COST_CAP_LIMIT = Decimal("1e8")  # dollars, not reached: what the Job's cost_cap column holds
DEFAULTS = RunOptions()


class InvalidOption(ValueError):
    """An option refused. `option` is its RunOptions field; `problem` the rule broken, for a caller that words it
    its own way (the API names metadata keys); `value` what was given (for `passed`, the deadline read)."""

    def __init__(
        self,
        option: str,
        message: str,
        problem: Literal["invalid", "hybrid_only", "missing", "passed"] = "invalid",
        value: object = None,
    ):
        super().__init__(message)
        self.option, self.problem, self.value = option, problem, value


def read(values: Mapping[str, Any], notify: bool = DEFAULTS.notify) -> RunOptions:
    """RunOptions from `values`, keyed by its fields: typed values, or strings to read. An absent value (None
    or "") is the default (for `notify`, the one given). Checked in field order; the first problem raises."""
    mode = values.get("mode") or Job.Mode.LIVE.value
    if mode not in Job.Mode.values:
        raise InvalidOption("mode", f"Supported values are: {', '.join(Job.Mode.values)}.", value=mode)
    return RunOptions(
        mode=mode,
        deadline=_deadline(mode, values.get("deadline")),
        metadata=values.get("metadata") or {},
        max_attempts=_whole(values, "max_attempts", MAX_ATTEMPTS, "how many times a request is sent before it fails"),
        output_retries=_whole(
            values,
            "output_retries",
            OUTPUT_RETRIES,
            "how many more times a request is sent when its answer is not the JSON its schema asks for",
        ),
        use_cache=_flag(values, "use_cache", DEFAULTS.use_cache),
        cost_cap=_cost_cap(values.get("cost_cap")),
        notify=_flag(values, "notify", notify),
    )


def _deadline(mode: str, given: datetime | str | None) -> datetime | None:
    """Hybrid's deadline, in the future; the other modes have none."""
    if mode != Job.Mode.HYBRID:
        if given:
            raise InvalidOption("deadline", "A deadline applies to hybrid mode only.", "hybrid_only", given)
        return None
    if not given:
        raise InvalidOption(
            "deadline", "A hybrid job needs a deadline: the time by which every answer must be in.", "missing"
        )
    deadline = _moment(given) if isinstance(given, str) else given
    if deadline is None:
        raise InvalidOption(
            "deadline",
            "Give an ISO 8601 time, such as '2027-06-30T18:00:00+02:00' (UTC without an offset), or Unix seconds, "
            "such as '1814371200'.",
            value=given,
        )
    if deadline <= timezone.now():
        raise InvalidOption("deadline", "The deadline has passed: choose a time in the future.", "passed", deadline)
    return deadline


def _moment(text: str) -> datetime | None:
    """An ISO 8601 time (naive means UTC) or Unix seconds, as an aware datetime; None if it is neither."""
    try:
        if re.fullmatch(r"\d+(\.\d+)?", text):
            return datetime.fromtimestamp(float(text), tz=UTC)
        moment = datetime.fromisoformat(text)
    except (ValueError, OverflowError, OSError):  # not a time, or one out of datetime's range
        return None
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def _whole(values: Mapping[str, Any], option: str, bounds: tuple[int, int], meaning: str) -> int:
    given = values.get(option)
    if given is None or given == "":
        return getattr(DEFAULTS, option)
    low, high = bounds
    if isinstance(given, str):
        number = int(given) if given.isascii() and given.isdigit() else None
    else:
        number = given
    if number is None or not low <= number <= high:
        raise InvalidOption(option, f"Give a whole number from {low} to {high}: {meaning}.", value=given)
    return number


def _flag(values: Mapping[str, Any], option: str, default: bool) -> bool:
    given = values.get(option)
    if given is None or given == "":
        return default
    if isinstance(given, bool):
        return given
    if given.lower() in ("false", "0", "no", "off"):
        return False
    if given.lower() in ("true", "1", "yes", "on"):
        return True
    raise InvalidOption(option, "Give 'true' or 'false'.", value=given)


def _cost_cap(given: Decimal | str | None) -> Decimal | None:
    if given is None or given == "":
        return None
    try:
        cap = Decimal(given)
    except ArithmeticError:
        cap = Decimal(-1)
    if not cap.is_finite() or cap < 0 or cap >= COST_CAP_LIMIT:
        raise InvalidOption("cost_cap", "Give an amount in dollars, such as '25.00'.", value=given)
    return cap.quantize(Decimal("0.0001"))
