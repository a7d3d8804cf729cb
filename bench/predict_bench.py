"""Batch scoring benchmark: `trimflow predict`'s texts/s against evaluate's batch throughput.

    python bench/predict_bench.py [--variant NAME] [--format csv] [--rounds 5]
                                  [--out reports/predict_bench.json]

Run after the pipeline (or `dvc repro quantize@<variant>`), from the project root, alone on the
machine. The variant (default: the one reports/metrics.json recommends) is loaded as `trimflow
predict --variant` loads it, and the test rows of evaluate's throughput measurement are written
to a file. Then, in alternating rounds:

1. evaluate: forward passes over the evaluate stage's own pre-tokenized throughput batches
   (`evaluate.throughput`: the first `repeats` batches of `batch_size` test rows), its timer;
2. predict: the file scored into another as `trimflow predict` scores it (read, check, tokenize,
   forward in length-sorted batches of the same size, write), after one untimed batch.

Throughput is texts per second over the timed calls; the target is predict within 10% of
evaluate.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.progress import track
from rich.table import Table
from variant_inputs import bench_variant_dir

from trimflow.compress.variants import load_variant
from trimflow.config.loading import load_params
from trimflow.evaluation.benchmark import throughput_summary, timed_forwards, torch_threads
from trimflow.evaluation.inputs import build_test_inputs, inference_data, throughput_batch_size
from trimflow.evaluation.machine import environment
from trimflow.layout import dvc_layout
from trimflow.monitoring.profile import split_texts
from trimflow.serving.batch_predict import predict_file
from trimflow.serving.loading import model_source
from trimflow.serving.tables import FORMATS, table_writer
from trimflow.utils.atomic import write_json

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
TARGET_RATIO = 0.9  # predict's texts/s over evaluate's, at least
CONSOLE = Console(stderr=True)


def print_results(results: dict, out: str) -> None:
    throughput = results["throughput_texts_per_s"]
    table = Table(title=f"predict {results['variant']} at batch {results['batch_size']} ({out})")
    for column in ("path", "texts/s"):
        table.add_column(column)
    for name, value in throughput.items():
        table.add_row(name, f"{value:.1f}")
    Console().print(table)
    Console().print(
        f"predict / evaluate: {results['predict_over_evaluate']:.2f} (target >= {TARGET_RATIO})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", help="a variant under models/ (default: the recommended)")
    parser.add_argument("--format", choices=sorted(set(FORMATS.values())), default="csv")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    parser.add_argument("--out", default="reports/predict_bench.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg, layout = load_params(), dvc_layout()
    variant, variant_dir = bench_variant_dir(layout, args.variant)
    ev = cfg.evaluate
    batch_size = throughput_batch_size(ev)

    inputs = build_test_inputs(inference_data(layout, ev.batch_size), cfg)
    rows = sum(len(batch["input_ids"]) for batch in inputs.throughput_batches)
    texts = split_texts(layout.prepared, "test", cfg.task.type)[:rows]
    model = load_variant(variant_dir, num_threads=ev.num_threads)
    with torch_threads(ev.num_threads):
        scorer = model_source(cfg, None, variant).load()

    timings = {"evaluate": [], "predict": []}
    with tempfile.TemporaryDirectory(prefix="trimflow-predict-") as tmp:
        source, scored = Path(tmp, f"in.{args.format}"), Path(tmp, f"out.{args.format}")
        with table_writer(source) as write:
            write(pd.DataFrame({"text": texts}))
        for _ in track(range(args.rounds), description="timing rounds", console=CONSOLE):
            batches = inputs.throughput_batches
            timings["evaluate"] += timed_forwards(
                model, batches, ev.throughput.warmup, len(batches), ev.num_threads
            )
            with torch_threads(ev.num_threads):
                scorer.predict_texts(texts[:batch_size], batch_size)  # untimed warm-up
                summary = predict_file(scorer, source, scored, batch_size=batch_size)
            timings["predict"].append((summary.seconds, summary.scored))

    throughput = {name: throughput_summary(t)["throughput_sps"] for name, t in timings.items()}
    results = {
        "variant": variant,
        "task": cfg.task.type,
        "batch_size": batch_size,
        "texts_timed_per_round": rows,
        "rounds": args.rounds,
        "input_format": args.format,
        "throughput_texts_per_s": throughput,
        "predict_over_evaluate": throughput["predict"] / throughput["evaluate"],
        "target_ratio_at_least": TARGET_RATIO,
        "environment": {**environment(), "num_threads": ev.num_threads},
    }
    write_json(args.out, results)
    print_results(results, args.out)


if __name__ == "__main__":
    main()
