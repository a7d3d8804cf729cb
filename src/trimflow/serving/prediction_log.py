"""`trimflow serve`'s prediction log: one JSON line per answered text (format:
monitoring/records.py), appended to `serve.prediction_log.path` by the micro-batch worker
thread after each batch and flushed, so the event loop never waits on the disk.

Texts are logged only with `serve.prediction_log.raw_text`, masked (`masking.py`); entities
are logged by type, position and score, never by their words.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

from trimflow.config.loading import ConfigError
from trimflow.config.schema import PredictionLogConfig
from trimflow.monitoring.records import prediction_record
from trimflow.serving.masking import Masker

log = logging.getLogger(__name__)


class PredictionLog:
    """The open log file (see the module docstring); `model` names what is served."""

    def __init__(self, cfg: PredictionLogConfig, model: str) -> None:
        self.path = Path(cfg.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = self.path.open("a", encoding="utf-8")
        except OSError as error:
            raise ConfigError(
                f"serve.prediction_log.path: cannot append to {self.path}: {error.strerror}"
            ) from None
        self.model = model
        self.mask = Masker(cfg.mask) if cfg.raw_text else None

    def write(self, texts: list[str], rows: list[dict], pieces: list[dict[str, int]]) -> None:
        """A line per text of one batch: its answer `row` and its `piece_counts`. A failed write
        is logged, and the batch still answered."""
        time = datetime.now(UTC).isoformat(timespec="milliseconds")
        lines = []
        for text, row, counts in zip(texts, rows, pieces, strict=True):
            record = {"time": time, "model": self.model, **prediction_record(text, row, counts)}
            if self.mask is not None:
                record["text"] = self.mask(text)
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        try:
            self.handle.writelines(lines)
            self.handle.flush()
        except OSError:
            log.exception("could not write %d predictions to %s", len(lines), self.path)

    def close(self) -> None:
        """Close the file."""
        self.handle.close()
