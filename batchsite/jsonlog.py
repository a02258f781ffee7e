"""BATCHSITE_LOG_FORMAT=json: one JSON object per log line, for log collectors that parse fields."""

import json
import logging
from datetime import UTC, datetime


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message"}, plus "exception" with the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)
