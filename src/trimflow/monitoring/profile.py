"""evaluate's reference profile: the prediction-log records of the recommended variant (the one
the report registers and `trimflow serve` serves) on every text of the test split.

The records are computed as the service computes its log (`VariantModel.predict_with_pieces`,
`records.prediction_record`), one per text, raw: `trimflow monitor` runs two-sample tests on
them, not only histograms.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trimflow.monitoring.records import LogFormatError, LoggedText, prediction_record, problems
from trimflow.serving.pyfunc import VariantModel
from trimflow.utils.atomic import read_json


def split_texts(prepared: Path, split: str, task: str) -> list[str]:
    """The texts of a prepared split as a client sends them (NER: the words joined by spaces)."""
    frame = pd.read_parquet(prepared / f"{split}.parquet")
    if task == "ner":
        return [" ".join(tokens) for tokens in frame["tokens"]]
    return frame["text"].tolist()


def reference_profile(
    model: VariantModel, texts: list[str], variant: str, split: str, batch_size: int
) -> dict:
    """The profile of `variant` (loaded as `model`) on `texts`: a record per text, in order.

    Texts are predicted shortest first, so that batches carry little padding."""
    order = np.argsort([len(text) for text in texts], kind="stable")
    rows, pieces = model.predict_with_pieces([texts[i] for i in order], batch_size)
    records: list[dict] = [{}] * len(texts)
    for position, index in enumerate(order):
        records[index] = prediction_record(texts[index], rows[position], pieces[position])
    return {
        "variant": variant,
        "task": "ner" if model.token_task else "classification",
        "split": split,
        "max_length": model.max_length,
        "truncation": model.truncation,
        "texts": len(texts),
        "records": records,
    }


class ReferenceProfile(BaseModel):
    """A reference profile as `trimflow monitor` reads it."""

    model_config = ConfigDict(extra="allow")

    variant: str
    task: Literal["classification", "ner"]
    records: list[LoggedText] = Field(min_length=1)

    @model_validator(mode="after")
    def _records_answer_the_task(self) -> ReferenceProfile:
        for index, record in enumerate(self.records):
            if record.task != self.task:
                raise ValueError(f"records[{index}] is a {record.task} answer, not {self.task}")
        return self


def read_profile(path: str | Path) -> ReferenceProfile:
    """The reference profile at `path`; `LogFormatError` naming the file and what is wrong."""
    try:
        payload = read_json(path)
    except FileNotFoundError:
        raise LogFormatError(
            f"{path}: no reference profile (evaluate writes it: run the pipeline)"
        ) from None
    except (OSError, ValueError) as error:
        raise LogFormatError(f"{path}: not a reference profile: {error}") from None
    try:
        return ReferenceProfile.model_validate(payload)
    except ValidationError as error:
        raise LogFormatError(f"{path}: {problems(error)}") from None
