"""Where each stage reads and writes: fixed paths under DVC, config-keyed paths in sweeps.

Every model variant lives in its own directory, `models/<variant>` under DVC. Stages that build
variants (adapt, prune, distill, quantize) run once per variant declared in config, as DVC `foreach`
stages `<stage>@<variant>`.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trimflow.config.schema import FINETUNED, TrimflowConfig
from trimflow.utils.atomic import read_json
from trimflow.utils.hashing import digest_json

# The label map that travels with data and every model directory.
LABEL_MAP_FILE = "label_map.json"
VARIANT = "{variant}"
# The finetune keys every training stage follows: batches, optimizer, loss, monitor, checkpoints.
FINETUNE_RECIPE = (
    "weight_decay",
    "warmup_ratio",
    "class_balance",
    "batch_size",
    "eval_batch_size",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "group_by_length",
    "monitor",
    "early_stopping_patience",
    "checkpoint_every_n_steps",
    "adversarial",
)
# The params each stage reads; `{variant}` stands for the variant a foreach stage builds.
# dvc.yaml's `params:` lists the same, with ${key} for {variant} (a test holds them equal).
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "prepare": ("seed", "dataset", "task"),
    "tokenize": ("model", "task"),
    "finetune": ("seed", "model", "task", "finetune", "trainer"),
    # Trains from the base model with the finetune recipe (not finetune's lr and length).
    "adapt": (
        "seed",
        "model",
        "task",
        *(f"finetune.{key}" for key in FINETUNE_RECIPE),
        "trainer",
        "adapt.lr",
        "adapt.max_epochs",
        "adapt.variants.{variant}",
    ),
    "distill": (
        "seed",
        "finetune",
        "trainer",
        "distill.temperature",
        "distill.alpha",
        "distill.hidden_weight",
        "distill.lr",
        "distill.max_epochs",
        "distill.limit_train_batches",
        "distill.students.{variant}",
    ),
    # Prunes the fine-tuned model or a student (prune.variants.{variant}.source).
    "prune": (
        "seed",
        "finetune",
        "trainer",
        "prune.importance_batches",
        "prune.recovery",
        "prune.variants.{variant}",
    ),
    # Calibration batches are cut at the fine-tuning evaluation batch size.
    "quantize": (
        "quantize.calibration_batches",
        "finetune.eval_batch_size",
        "quantize.variants.{variant}",
    ),
    # model.max_length: the reference profile tokenizes as the served model does.
    "evaluate": (
        "evaluate",
        "model.max_length",
        "adapt.variants",
        "prune.variants",
        "distill.students",
        "quantize.variants",
        "report.baseline",
        "report.max_drop_pts",
        "report.guard_metrics",
        "report.objective",
        "task",
    ),
    "report": ("report",),
}
STAGES = tuple(STAGE_PARAMS)
VARIANT_STAGES = ("adapt", "prune", "distill", "quantize")
# Inside data/prepared/: one `<split>.parquet` per split.
SPLITS = ("train", "validation", "test")
# Inside data/tokenized/: the Arrow splits and the tokenizer they were made with.
TOKENIZED_SPLITS = "splits"
TOKENIZER = "tokenizer"
# Inside a trained variant's directory: its training curves, and a summary of its training
# (steps, time, samples/s, parameters trained, peak memory) that quantized copies carry along.
HISTORY_FILE = "history.csv"
TRAINING_FILE = "training.json"
# Inside an adapted variant's directory: the adapter alone, and what it adapts (method, base).
ADAPTER_DIR = "adapter"
ADAPTATION_FILE = "adaptation.json"


@dataclass(frozen=True)
class Layout:
    """Directories of one pipeline instance."""

    prepared: Path
    tokenized: Path
    models: Path
    reports: Path
    work: Path
    # variant -> config digest suffixed to its directory name (sweeps); empty under DVC.
    model_keys: Mapping[str, str] = field(default_factory=dict)

    def model_dir(self, variant: str) -> Path:
        """The directory of `variant`, its name suffixed by its config digest in sweeps."""
        key = self.model_keys.get(variant)
        return self.models / (f"{variant}-{key}" if key else variant)

    @property
    def finetuned(self) -> Path:
        """The fine-tuned model's directory."""
        return self.model_dir(FINETUNED)

    @property
    def tokenized_splits(self) -> Path:
        """tokenize's Arrow splits."""
        return self.tokenized / TOKENIZED_SPLITS

    @property
    def tokenizer_dir(self) -> Path:
        """The tokenizer the splits were made with."""
        return self.tokenized / TOKENIZER

    @property
    def metrics_file(self) -> Path:
        """evaluate's summary: every variant's numbers and the recommendation."""
        return self.reports / "metrics.json"

    @property
    def reference_profile(self) -> Path:
        """evaluate's prediction-log records of the recommended variant on the test split."""
        return self.reports / "reference_profile.json"

    @property
    def variant_details(self) -> Path:
        """evaluate's detail file per variant and the machine it measured on."""
        return self.reports / "variants"

    @property
    def report_file(self) -> Path:
        """The self-contained HTML report."""
        return self.reports / "report.html"

    @property
    def plots(self) -> Path:
        """The report's figures and the numbers behind them."""
        return self.reports / "plots"


def dvc_layout(root: Path = Path(".")) -> Layout:
    """The fixed paths dvc.yaml declares."""
    return Layout(
        prepared=root / "data/prepared",
        tokenized=root / "data/tokenized",
        models=root / "models",
        reports=root / "reports",
        work=root / ".trimflow/work",
    )


def _lookup(dumped: dict[str, Any], dotted: str) -> Any:
    value: Any = dumped
    for part in dotted.split("."):
        value = value[part]
    return value


def stage_params(cfg: TrimflowConfig, stage: str, variant: str | None = None) -> dict[str, Any]:
    """The values of the params `stage` (building `variant`) reads, by dotted key."""
    dumped = cfg.model_dump(mode="json")
    keys = [key.replace(VARIANT, variant or "") for key in STAGE_PARAMS[stage]]
    return {key: _lookup(dumped, key) for key in keys}


def stage_units(cfg: TrimflowConfig) -> list[tuple[str, str | None]]:
    """(stage, variant) in run order; variant is None for stages that run once."""
    kinds = cfg.variant_kinds()
    units: list[tuple[str, str | None]] = []
    for stage in STAGES:
        if stage in VARIANT_STAGES:
            units += [(stage, name) for name, kind in kinds.items() if kind == stage]
        else:
            units.append((stage, None))
    return units


def unit_name(stage: str, variant: str | None) -> str:
    """The DVC stage name: `prune@pruned` for a variant stage, else the stage itself."""
    return f"{stage}@{variant}" if variant else stage


def stage_keys(cfg: TrimflowConfig) -> dict[str, str]:
    """A digest per stage unit over its own params and the digests of what it reads."""
    keys: dict[str, str] = {}
    variant_keys = {}
    upstream = ""
    for stage, variant in stage_units(cfg):
        params = stage_params(cfg, stage, variant)
        if stage in ("quantize", "prune"):
            source = getattr(cfg, stage).variants[variant].source
            inputs = [variant_keys[source]]
        elif stage == "adapt":  # from the base model, beside finetune
            inputs = [keys["tokenize"]]
        elif stage in VARIANT_STAGES:
            inputs = [keys["finetune"]]
        elif stage == "evaluate":
            inputs = [keys["tokenize"], *variant_keys.values()]
        else:
            inputs = [upstream]
        key = digest_json({"inputs": inputs, **params})
        keys[unit_name(stage, variant)] = key
        if variant or stage == "finetune":
            variant_keys[variant or FINETUNED] = key
        if not variant:
            upstream = key
    return keys


@contextlib.contextmanager
def keyed_work_dir(
    cfg: TrimflowConfig, layout: Layout, stage: str, variant: str | None = None
) -> Iterator[Path]:
    """The scratch folder of a training unit, keyed by its config digest: a rerun after an
    interruption resumes from the checkpoints left there. Removed once the block succeeds."""
    work_dir = layout.work / f"{stage}-{stage_keys(cfg)[unit_name(stage, variant)]}"
    yield work_dir
    shutil.rmtree(work_dir, ignore_errors=True)


def keyed_layout(cfg: TrimflowConfig, store: Path) -> Layout:
    """Paths keyed by config digest, so identical upstream work is shared across a sweep."""
    keys = stage_keys(cfg)
    model_keys = {
        variant: keys[unit_name(kind, None if kind == "finetune" else variant)]
        for variant, kind in cfg.variant_kinds().items()
    }
    return Layout(
        prepared=store / f"prepared-{keys['prepare']}",
        tokenized=store / f"tokenized-{keys['tokenize']}",
        models=store / "models",
        reports=store / f"reports-{keys['report']}",
        work=store / "work",
        model_keys=model_keys,
    )


def unit_output(layout: Layout, stage: str, variant: str | None) -> Path:
    """The directory a stage unit's completeness is judged by (its main output)."""
    if variant:
        return layout.model_dir(variant)
    return {
        "prepare": layout.prepared,
        "tokenize": layout.tokenized,
        "finetune": layout.finetuned,
        "evaluate": layout.variant_details,
        "report": layout.report_file,
    }[stage]


def read_label_map(directory: str | Path) -> dict:
    """The label map that travels with data and models: labels, dataset name and digest."""
    return read_json(Path(directory) / LABEL_MAP_FILE)
