"""Where each stage reads and writes: fixed paths under DVC, config-keyed paths in sweeps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trimflow.config.schema import TrimflowConfig
from trimflow.utils.hashing import digest_json

# The config sections each stage reads; dvc.yaml's `params:` lists the same (a test holds it).
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "prepare": ("seed", "dataset"),
    "tokenize": ("model", "task"),
    "finetune": ("seed", "model", "task", "finetune", "trainer"),
    "prune": ("seed", "finetune", "prune", "trainer"),
    "quantize": ("quantize",),
    "evaluate": ("evaluate",),
    "report": ("report",),
}
STAGES = tuple(STAGE_PARAMS)
# Inside data/tokenized/: the Arrow splits and the tokenizer they were made with.
TOKENIZED_SPLITS = "splits"
TOKENIZER = "tokenizer"


@dataclass(frozen=True)
class Layout:
    """Directories of one pipeline instance."""

    prepared: Path
    tokenized: Path
    finetuned: Path
    pruned: Path
    quantized: Path
    reports: Path
    work: Path

    @property
    def tokenized_splits(self) -> Path:
        return self.tokenized / TOKENIZED_SPLITS

    @property
    def tokenizer_dir(self) -> Path:
        return self.tokenized / TOKENIZER

    @property
    def fp32_variants(self) -> dict[str, Path]:
        """The unquantized model variants by name."""
        return {"finetuned": self.finetuned, "pruned": self.pruned}

    @property
    def metrics_file(self) -> Path:
        return self.reports / "metrics.json"

    @property
    def variant_details(self) -> Path:
        return self.reports / "variants"

    @property
    def plots(self) -> Path:
        return self.reports / "plots"


def dvc_layout(root: Path = Path(".")) -> Layout:
    """The fixed paths dvc.yaml declares."""
    return Layout(
        prepared=root / "data/prepared",
        tokenized=root / "data/tokenized",
        finetuned=root / "models/finetuned",
        pruned=root / "models/pruned",
        quantized=root / "models/quantized",
        reports=root / "reports",
        work=root / ".trimflow/work",
    )


def stage_keys(cfg: TrimflowConfig) -> dict[str, str]:
    """A digest per stage over its own params and every upstream stage's digest."""
    dumped = cfg.model_dump(mode="json")
    keys: dict[str, str] = {}
    upstream = ""
    for stage, sections in STAGE_PARAMS.items():
        upstream = digest_json({"upstream": upstream, **{s: dumped[s] for s in sections}})
        keys[stage] = upstream
    return keys


def keyed_layout(cfg: TrimflowConfig, store: Path) -> Layout:
    """Paths keyed by config digest, so identical upstream work is shared across a sweep."""
    keys = stage_keys(cfg)
    return Layout(
        prepared=store / f"prepared-{keys['prepare']}",
        tokenized=store / f"tokenized-{keys['tokenize']}",
        finetuned=store / f"finetuned-{keys['finetune']}",
        pruned=store / f"pruned-{keys['prune']}",
        quantized=store / f"quantized-{keys['quantize']}",
        reports=store / f"reports-{keys['report']}",
        work=store / "work",
    )


def stage_output(layout: Layout, stage: str) -> Path:
    """The directory a stage's completeness is judged by (its main output)."""
    return {
        "prepare": layout.prepared,
        "tokenize": layout.tokenized,
        "finetune": layout.finetuned,
        "prune": layout.pruned,
        "quantize": layout.quantized,
        "evaluate": layout.variant_details,
        "report": layout.reports / "report.html",
    }[stage]
