"""`trimflow predict`: batch scoring of a table file (csv, jsonl, parquet) into another.

The model is loaded as `trimflow serve` loads it and answers each text as the pyfunc does. The
output has every input column, in order, then the prediction columns (classification: `label`,
`score`, `truncated`; NER: `entities`, `truncated`) and `error`: null for a scored row, else why
the row was not scored (its text missing, not a string, empty or too long, or its jsonl line
unreadable), so that bad rows are reported and the run goes on. Rows are read in chunks, sorted
by length within a chunk for the forward passes (less padding) and written back in their order
to a temporary file, renamed to the output when every row is done.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
from mlflow.exceptions import MlflowException

from trimflow.config.schema import TrimflowConfig
from trimflow.data.errors import DataError
from trimflow.evaluation.benchmark import torch_threads
from trimflow.serving.loading import ModelLoadError, model_source
from trimflow.serving.pyfunc import BATCH_SIZE, VariantModel, text_problem
from trimflow.serving.tables import Chunk, read_chunks, row_count, table_format, table_writer
from trimflow.utils.progress import counting

CHUNK_ROWS = 4096
SHOWN_BAD_ROWS = 5
ENTITY = pa.struct(
    [
        ("type", pa.string()),
        ("text", pa.string()),
        ("start", pa.int64()),
        ("end", pa.int64()),
        ("score", pa.float64()),
    ]
)
PREDICTION_TYPES = {
    "classification": pa.schema(
        [("label", pa.string()), ("score", pa.float64()), ("truncated", pa.bool_())]
    ),
    "ner": pa.schema([("entities", pa.list_(ENTITY)), ("truncated", pa.bool_())]),
}
ERROR = pa.field("error", pa.string())
log = logging.getLogger(__name__)


@dataclass
class Summary:
    """What a run scored, and the first bad rows: (row number, reason)."""

    input: Path
    output: Path
    rows: int = 0
    scored: int = 0
    first_bad: list[tuple[int, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def bad(self) -> int:
        """Rows not scored."""
        return self.rows - self.scored

    def texts_per_s(self) -> float:
        """Texts scored per second, reading and writing included."""
        return self.scored / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        """The summary for the log."""
        lines = [
            f"{self.input} -> {self.output}: {self.rows} rows, {self.scored} scored, {self.bad} "
            f"bad; {self.texts_per_s():.1f} texts/s over {self.seconds:.1f}s"
        ]
        if self.bad:
            shown = "; ".join(f"row {row}: {reason}" for row, reason in self.first_bad)
            more = (
                f"; and {self.bad - len(self.first_bad)} more" if self.bad > SHOWN_BAD_ROWS else ""
            )
            lines.append(f"bad rows (data rows from 1; see the error column): {shown}{more}")
        return lines


def predict(
    cfg: TrimflowConfig,
    input_path: Path,
    output_path: Path,
    model_uri: str | None = None,
    variant: str | None = None,
    text_column: str = "text",
    batch_size: int = BATCH_SIZE,
) -> Summary:
    """Load the model as `trimflow serve` does and score `input_path` into `output_path` on
    `evaluate.num_threads` torch threads; `ModelLoadError` when the model cannot be loaded."""
    for path in (input_path, output_path):
        table_format(path)  # an unknown suffix fails before the model loads
    if not input_path.is_file():
        raise FileNotFoundError(f"{input_path}: no such file")
    source = model_source(cfg, model_uri, variant)
    log.info("loading %s", source.name)
    with torch_threads(cfg.evaluate.num_threads):
        try:
            model = source.load()
        except (MlflowException, OSError) as error:
            raise ModelLoadError(f"could not load {source.name}: {error}") from error
        summary = predict_file(model, input_path, output_path, text_column, batch_size)
    for line in summary.lines():
        log.info("%s", line)
    return summary


def predict_file(
    model: VariantModel,
    input_path: Path,
    output_path: Path,
    text_column: str = "text",
    batch_size: int = BATCH_SIZE,
    chunk_rows: int = CHUNK_ROWS,
) -> Summary:
    """Score the texts of `input_path`'s `text_column` into `output_path` (see the module
    docstring); `DataError` naming the file for a bad file or column, or one without rows."""
    types = PREDICTION_TYPES["ner" if model.token_task else "classification"]
    summary = Summary(input_path, output_path)
    started = time.perf_counter()
    with (
        table_writer(output_path, types.append(ERROR)) as write,
        counting(row_count(input_path), f"predict {input_path.name}", log, "row") as advance,
    ):
        for chunk in read_chunks(input_path, chunk_rows):
            check_columns(chunk.frame, input_path, text_column, types)
            if len(chunk.frame):
                write(score_chunk(model, chunk, text_column, batch_size, types, summary))
            advance(len(chunk.frame))
        if summary.rows == 0:
            raise DataError(f"{input_path}: no data rows")
    summary.seconds = time.perf_counter() - started
    return summary


def check_columns(frame: pd.DataFrame, path: Path, text_column: str, types: pa.Schema) -> None:
    """`DataError` unless the frame has the text column and none named as an output column."""
    columns = list(frame.columns)
    if text_column not in columns:
        raise DataError(
            f"{path}: no column {text_column!r} (pass --text-column); its columns: "
            f"{', '.join(map(str, columns)) or 'none'}"
        )
    if taken := [name for name in [*types.names, ERROR.name] if name in columns]:
        raise DataError(
            f"{path}: the output columns {', '.join(taken)} are input columns too; "
            "rename them in the input"
        )


def score_chunk(
    model: VariantModel,
    chunk: Chunk,
    text_column: str,
    batch_size: int,
    types: pa.Schema,
    summary: Summary,
) -> pd.DataFrame:
    """The chunk's frame with the prediction columns and `error`; counts it in `summary`."""
    frame, problems = chunk.frame, dict(chunk.unreadable)
    texts = dict(zip(frame.index, frame[text_column].tolist(), strict=True))
    for index, text in texts.items():
        if index not in problems and (problem := text_problem(text, model.max_chars)):
            problems[index] = f"text {problem}"
    good = [index for index in frame.index if index not in problems]
    predicted = predict_by_length(model, [texts[index] for index in good], batch_size)
    rows = dict(zip(good, predicted, strict=True))
    summary.rows += len(frame)
    summary.scored += len(good)
    room = SHOWN_BAD_ROWS - len(summary.first_bad)
    summary.first_bad += [(index + 1, problems[index]) for index in sorted(problems)[:room]]
    predictions = {
        name: pd.Series(
            [rows[index][name] if index in rows else None for index in frame.index],
            index=frame.index,
            dtype=object,
        )
        for name in types.names
    }
    error = pd.Series([problems.get(index) for index in frame.index], frame.index, dtype=object)
    return frame.assign(**predictions, **{ERROR.name: error})


def predict_by_length(model: VariantModel, texts: list[str], batch_size: int) -> list[dict]:
    """`model.predict_texts(texts)`, batched in order of length (less padding), in `texts`'
    order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    rows = model.predict_texts([texts[i] for i in order], batch_size)
    ordered: list[dict] = [{}] * len(texts)
    for i, row in zip(order, rows, strict=True):
        ordered[i] = row
    return ordered
