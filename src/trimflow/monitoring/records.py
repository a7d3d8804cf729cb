"""The prediction log's line format: written by `trimflow serve`, by evaluate's reference profile
(without time, model and text), read strictly by `trimflow monitor`.

One JSON object per text:

    time            UTC, ISO 8601 (when the batch was answered)
    model           what was served: a model URI or a variant name
    label, score    classification: the predicted label and its probability
    entities        NER, instead: [{"type", "start", "end", "score"}] (no entity text)
    chars           characters of the text
    pieces          its word pieces (those truncation cut off included; no special tokens)
    unknown_pieces  how many of them are the tokenizer's unknown token
    truncated       whether the text was longer than max_length tokens (model.truncation cut it)
    text            only with serve.prediction_log.raw_text: the text, masked

Other keys are allowed (and ignored), so that logs written elsewhere may carry their own.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# The keys of a logged entity: its position and score, not its text.
ENTITY_FIELDS = ("type", "start", "end", "score")
Count = Annotated[int, Field(ge=0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class LogFormatError(ValueError):
    """A prediction log or reference profile that does not follow the format."""


def prediction_record(text: str, row: dict, pieces: dict[str, int]) -> dict:
    """The log fields of one answered text but time, model and text: `row` is its
    `VariantModel` answer, `pieces` its `piece_counts`."""
    if "entities" in row:
        predicted = {
            "entities": [{key: entity[key] for key in ENTITY_FIELDS} for entity in row["entities"]]
        }
    else:
        predicted = {"label": row["label"], "score": row["score"]}
    return {**predicted, "chars": len(text), **pieces, "truncated": row["truncated"]}


class LoggedEntity(BaseModel):
    """One entity of a logged NER answer."""

    model_config = ConfigDict(strict=True, extra="allow")

    type: str = Field(min_length=1)
    score: Probability


class LoggedText(BaseModel):
    """One line of a prediction log, checked: a classification or a NER answer and its text's
    statistics."""

    model_config = ConfigDict(strict=True, extra="allow")

    chars: Count
    pieces: Count
    unknown_pieces: Count
    truncated: bool
    label: str | None = Field(default=None, min_length=1)
    score: Probability | None = None
    entities: list[LoggedEntity] | None = None

    @model_validator(mode="after")
    def _one_answer(self) -> LoggedText:
        if (self.label is None) == (self.entities is None):
            raise ValueError("expected 'label' and 'score' (classification) or 'entities' (NER)")
        if self.label is not None and self.score is None:
            raise ValueError("'label' without its 'score'")
        if self.unknown_pieces > self.pieces:
            raise ValueError("'unknown_pieces' exceeds 'pieces'")
        return self

    @property
    def task(self) -> str:
        """`ner` or `classification`."""
        return "ner" if self.entities is not None else "classification"


def problems(error: ValidationError) -> str:
    """A validation error in one line: each field and what is wrong with it."""
    found = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        found.append(f"{'.'.join(map(str, item['loc']))}: {message}" if item["loc"] else message)
    return "; ".join(found)


def read_log(path: str | Path, task: str | None = None) -> list[LoggedText]:
    """The lines of a prediction log (blank ones skipped), all answers of `task` (default: the
    first line's); `LogFormatError` naming the file and line of the first bad one."""
    path = Path(path)
    try:
        with open(path, "rb") as lines:
            return _checked_lines(path, lines, task)
    except OSError as error:
        raise LogFormatError(f"{path}: cannot read the log: {error.strerror}") from None


def _checked_lines(path: Path, lines: Iterable[bytes], task: str | None) -> list[LoggedText]:
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = LoggedText.model_validate_json(line)
        except ValidationError as error:
            raise LogFormatError(f"{path}:{number}: {problems(error)}") from None
        task = task or record.task
        if record.task != task:
            raise LogFormatError(f"{path}:{number}: a {record.task} answer, expected {task}")
        records.append(record)
    return records
