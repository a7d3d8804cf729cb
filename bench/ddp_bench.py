"""Data-parallel fine-tuning against one process on the same machine; prints the ratio.

    python bench/ddp_bench.py [--steps 40] [--processes 2] [--out reports/bench_ddp.json]

Fine-tunes the embedded default (R8 + MiniLM) for `--steps` optimizer steps of global batch
`finetune.batch_size`, alternately, `--rounds` times each: `trimflow finetune` in one process,
and with `trainer.strategy=ddp trainer.devices=N` (gloo, batch / N per process; Lightning gives
each process cores / N threads). Reports the training loop's samples/s (training.json: every
process's samples over the loop's wall time) and each command's wall time (process start,
imports and, for DDP, starting the other processes included).
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

from trimflow.config.loading import compose_config
from trimflow.evaluation.machine import environment
from trimflow.layout import dvc_layout
from trimflow.utils.atomic import write_json


def finetune_once(root: Path, overrides: list[str]) -> dict:
    """Fine-tune afresh in `root` with `overrides`; the training loop's pace and wall time."""
    layout = dvc_layout(root)
    shutil.rmtree(layout.finetuned, ignore_errors=True)
    wall = run_stage(root, "finetune", overrides)
    summary = json.loads((layout.finetuned / "training.json").read_text())
    return {"samples_per_s": summary["train_samples_per_s"], "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--processes", type=int, default=2, help="DDP processes")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each, alternated")
    parser.add_argument("--out", default="reports/bench_ddp.json")
    args = parser.parse_args()
    common = [f"finetune.max_steps={args.steps}", "tracking.enabled=false"]
    batch = compose_config().finetune.batch_size
    if batch % args.processes:
        raise SystemExit(f"finetune.batch_size {batch} does not split into {args.processes}")
    setups = {
        "one_process": common,
        "ddp": [
            *common,
            f"finetune.batch_size={batch // args.processes}",
            "trainer.strategy=ddp",
            "trainer.accelerator=cpu",
            f"trainer.devices={args.processes}",
        ],
    }
    runs: dict[str, list[dict]] = {name: [] for name in setups}
    with tempfile.TemporaryDirectory(prefix="trimflow-ddp-bench-") as folder:
        root = Path(folder)
        for stage in ("prepare", "tokenize"):
            run_stage(root, stage, common)
        for _ in range(args.rounds):
            for name, overrides in setups.items():
                runs[name].append(finetune_once(root, overrides))
    summary = {
        name: {
            "samples_per_s": statistics.median(r["samples_per_s"] for r in measured),
            "wall_s": statistics.median(r["wall_s"] for r in measured),
            "runs": measured,
        }
        for name, measured in runs.items()
    }
    results = {
        "steps": args.steps,
        "global_batch_size": batch,
        "processes": args.processes,
        **summary,
        "samples_per_s_ratio": summary["ddp"]["samples_per_s"]
        / summary["one_process"]["samples_per_s"],
        "wall_ratio": summary["ddp"]["wall_s"] / summary["one_process"]["wall_s"],
        "environment": environment(),
    }
    write_json(args.out, results)
    table = Table(title=f"DDP ({args.processes} processes) vs one process ({args.out})")
    for column in ("measure", "ddp", "one process", "ratio"):
        table.add_column(column)
    table.add_row(
        "training loop samples/s",
        f"{summary['ddp']['samples_per_s']:.1f}",
        f"{summary['one_process']['samples_per_s']:.1f}",
        f"{results['samples_per_s_ratio']:.2f}x",
    )
    table.add_row(
        "`trimflow finetune` wall time (s)",
        f"{summary['ddp']['wall_s']:.1f}",
        f"{summary['one_process']['wall_s']:.1f}",
        f"{results['wall_ratio']:.2f}x",
    )
    Console().print(table)


if __name__ == "__main__":
    main()
