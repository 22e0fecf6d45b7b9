"""Structured JSON logs: one object per line, with the request id when there is one.

The server's, uvicorn's, transformers' and Python's warnings all go through the JSON
formatter on stderr, and progress bars are off, so every line of the stream parses.
Prompt text is logged only when `log_prompts` is on; API keys are never passed to a logger.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_ROUTED = ("neuronguard", "uvicorn", "uvicorn.error", "transformers", "huggingface_hub", "py.warnings")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD and v is not None})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)  # server-side only, never sent to clients
        return json.dumps(entry, default=str)


def disable_progress_bars() -> None:
    """tqdm bars (weight loading, downloads) would break the one-object-per-line stream."""
    os.environ["TQDM_DISABLE"] = "1"  # any tqdm created from now on, whoever creates it
    from huggingface_hub.utils import disable_progress_bars as hub_off
    from transformers.utils import logging as transformers_logging

    hub_off()
    transformers_logging.disable_progress_bar()


def configure_logging(level: str = "INFO") -> None:
    """Route every library's logs through the JSON formatter on stderr; no progress bars."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    library_level = max(logging.WARNING, logging.getLevelName(level))  # their info lines are noise here
    for name in _ROUTED:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level if name.startswith(("neuronguard", "uvicorn")) else library_level)
        logger.propagate = False
    logging.captureWarnings(True)  # warnings.warn(...) from any library, as JSON on "py.warnings"
    logging.getLogger("uvicorn.access").disabled = True  # the server logs each request itself
    disable_progress_bars()
