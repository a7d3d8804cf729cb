"""Read raw splits into DataFrames with `text` and `label` columns, keeping source row numbers.

Two sources share one output shape: local files (csv, jsonl, parquet, Orange .tab, also
`package://` files shipped in wheels) and Hugging Face datasets via `datasets.load_dataset`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from trimflow.assets import resolve
from trimflow.config.schema import DatasetConfig

SUFFIX_FORMATS = {
    ".tab": "tab",
    ".tsv": "tab",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".parquet": "parquet",
}
# Orange .tab files carry three header lines: names, types, flags.
ORANGE_EXTRA_HEADER_ROWS = [1, 2]


class DataError(ValueError):
    """Bad input data; the message names the file and row or column."""


def load_raw_splits(cfg: DatasetConfig) -> dict[str, pd.DataFrame]:
    """Return {'train'[, 'test'][, 'validation']} frames with columns text, label, source, row."""
    names = {"train": cfg.train, "test": cfg.test, "validation": cfg.validation}
    reader = _read_hf_split if cfg.source == "hf" else _read_file
    return {split: reader(cfg, location) for split, location in names.items() if location}


def _read_file(cfg: DatasetConfig, location: str) -> pd.DataFrame:
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


def _read_hf_split(cfg: DatasetConfig, split: str) -> pd.DataFrame:
    import datasets

    try:
        data = datasets.load_dataset(resolve(cfg.name), cfg.subset, split=split)
    except Exception as err:  # the hub client raises many unrelated types
        raise DataError(f"dataset '{cfg.name}' split '{split}': cannot be loaded: {err}") from err
    label_feature = data.features.get(cfg.label_column)
    frame = data.to_pandas()
    if cfg.label_column in frame and hasattr(label_feature, "int2str"):
        frame[cfg.label_column] = frame[cfg.label_column].map(label_feature.int2str)
    return _select_columns(frame, cfg, f"{cfg.name}[{split}]", first_row=0)


def _select_columns(
    frame: pd.DataFrame, cfg: DatasetConfig, source: str, first_row: int
) -> pd.DataFrame:
    for key, column in (("text_column", cfg.text_column), ("label_column", cfg.label_column)):
        if column not in frame.columns:
            raise DataError(
                f"{source}: column '{column}' (dataset.{key}) not found; "
                f"columns are {list(frame.columns)}"
            )
    return pd.DataFrame(
        {
            "text": frame[cfg.text_column].to_numpy(),
            "label": frame[cfg.label_column].astype(str).to_numpy(),
            "source": source,
            "row": range(first_row, first_row + len(frame)),
        }
    )
