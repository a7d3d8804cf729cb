"""The cost to train of each parameter-efficient method against the full fine-tune, measured in
the same run on the same machine; prints the ratios.

    python bench/peft_bench.py [--samples 960] [--rounds 2] [--methods lora,bitfit,ia3]
                               [--out reports/bench_peft.json]

On the embedded default (R8 + MiniLM) cut to `--samples` training documents, runs one epoch of
`trimflow finetune` and of `trimflow adapt --variant <method>` (experiment=zoo declares every
method), alternately, `--rounds` times each, every run its own process. Reports from each run's
training.json the training loop's samples/s, the peak training memory (the process's peak
resident set during the loop) and the trainable parameters, the median over the rounds, and
each method's ratios against the full fine-tune.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table
from stage_runs import run_stage

from trimflow.evaluation.footprint import size_on_disk_mb
from trimflow.evaluation.machine import environment
from trimflow.layout import ADAPTER_DIR, TRAINING_FILE, dvc_layout
from trimflow.utils.atomic import write_json

FULL = "finetuned"


def train_once(root: Path, method: str, overrides: list[str]) -> dict:
    """Train `method` (or the full fine-tune) afresh in `root`; its training.json figures."""
    out = dvc_layout(root).model_dir(method)
    shutil.rmtree(out, ignore_errors=True)
    if method == FULL:
        wall = run_stage(root, "finetune", overrides)
    else:
        wall = run_stage(root, "adapt", overrides, "--variant", method)
    summary = json.loads((out / TRAINING_FILE).read_text())
    adapter = out / ADAPTER_DIR
    return {
        "samples_per_s": summary["train_samples_per_s"],
        "peak_train_mem_mb": summary["peak_train_mem_mb"],
        "trainable_params": summary["trainable_params"],
        "total_params": summary["total_params"],
        "saved_mb": size_on_disk_mb(adapter if adapter.is_dir() else out / "model.safetensors"),
        "wall_s": wall,
    }


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per method: the median of each figure over the rounds, and ratios to the full fine-tune."""
    medians = {
        name: {key: statistics.median(run[key] for run in measured) for key in measured[0]}
        for name, measured in runs.items()
    }
    full = medians[FULL]
    return {
        name: {
            **values,
            "trainable_share": values["trainable_params"] / values["total_params"],
            "samples_per_s_ratio": values["samples_per_s"] / full["samples_per_s"],
            "peak_mem_reduction": 1 - values["peak_train_mem_mb"] / full["peak_train_mem_mb"],
            "runs": runs[name],
        }
        for name, values in medians.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=960, help="training documents")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each, alternated")
    parser.add_argument("--methods", default="lora,bitfit,ia3", help="adapt variants of zoo")
    parser.add_argument("--out", default="reports/bench_peft.json")
    args = parser.parse_args()
    overrides = [
        "experiment=zoo",
        f"dataset.max_train_samples={args.samples}",
        "finetune.max_epochs=1",
        "adapt.max_epochs=1",
        "tracking.enabled=false",
    ]
    names = [FULL, *args.methods.split(",")]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="trimflow-peft-bench-") as folder:
        root = Path(folder)
        for stage in ("prepare", "tokenize"):
            run_stage(root, stage, overrides)
        for _ in range(args.rounds):
            for name in names:
                runs[name].append(train_once(root, name, overrides))
    summary = summarise(runs)
    write_json(
        args.out,
        {"samples": args.samples, "rounds": args.rounds, **summary, "environment": environment()},
    )
    table = Table(title=f"Cost to train, one epoch of {args.samples} R8 documents ({args.out})")
    for column in (
        "method",
        "trainable",
        "samples/s",
        "vs full",
        "peak memory MB",
        "lower by",
        "saved MB",
    ):
        table.add_column(column)
    for name, values in summary.items():
        table.add_row(
            name,
            f"{values['trainable_params']:,.0f} ({values['trainable_share']:.2%})",
            f"{values['samples_per_s']:.1f}",
            f"{values['samples_per_s_ratio']:.2f}x",
            f"{values['peak_train_mem_mb']:.0f}",
            f"{values['peak_mem_reduction']:.0%}",
            f"{values['saved_mb']:.2f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
