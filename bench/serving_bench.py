"""Serving benchmark: `mlflow models serve` at batch 32 against evaluate's in-process throughput.

    python bench/serving_bench.py [--variant NAME] [--rounds 5] [--out reports/serving_bench.json]

Run after the pipeline (or `dvc repro quantize@<variant>`), from the project root, alone on the
machine. The variant (default: the one reports/metrics.json recommends) is logged as a pyfunc in
a temporary MLflow store, registered as `trimflow-<task>` and served as
`models:/trimflow-<task>@champion` on 127.0.0.1. Then, in alternating rounds on the same texts:

1. evaluate: forward passes over the evaluate stage's own pre-tokenized throughput batches
   (`evaluate.throughput`: the first `repeats` batches of `batch_size` test rows), its timer;
2. pyfunc: the logged model loaded in this process, texts in (tokenize, forward, records out);
3. served: the same batches of texts POSTed as JSON to the scoring server.

Throughput is texts per second over the timed calls. Finally the whole test split is sent to
the server, 32 texts per request, and its predictions are compared with the in-process pyfunc's
and, for classification, with the variant's arg-max over the tokenized test split batched the
same way and batched as evaluate scores it (length-sorted): dynamic int8 activation ranges
depend on a batch's padding, so the latter can differ on a few borderline texts.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from rich.console import Console
from rich.progress import track
from rich.table import Table
from variant_inputs import bench_variant_dir

from trimflow.compress.variants import load_variant
from trimflow.config.loading import load_params
from trimflow.config.schema import TrimflowConfig
from trimflow.data.datamodule import TokenizedDataModule
from trimflow.evaluation.benchmark import (
    throughput_summary,
    timed_forwards,
    torch_threads,
)
from trimflow.evaluation.inference import predict_logits
from trimflow.evaluation.inputs import (
    TestInputs,
    build_test_inputs,
    chunks,
    inference_data,
    throughput_batch_size,
)
from trimflow.evaluation.machine import environment
from trimflow.evaluation.scoring import make_scorer
from trimflow.layout import dvc_layout, read_label_map
from trimflow.monitoring.profile import split_texts
from trimflow.serving.pyfunc import log_variant_model
from trimflow.serving.registry import champion_uri, register_recommended, registered_model_name
from trimflow.serving.server import ScoringServer
from trimflow.utils.atomic import write_json

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
TARGET_RATIO = 1.5  # evaluate's texts/s over the server's, at most
CONSOLE = Console(stderr=True)


def file_order_batches(data: TokenizedDataModule, size: int) -> list[dict]:
    """The tokenized test split in file order, `size` rows per padded batch: the rows the
    server gets in each request (evaluate scores length-sorted batches instead)."""
    test = data.splits["test"]
    return [data.collator([test[row] for row in rows]) for rows in chunks(range(len(test)), size)]


def timed_text_calls(predict: Callable[[list[str]], list], batches: list[list[str]]) -> list:
    """(seconds, batch size) of `predict` on each batch, after one untimed warm-up call."""
    predict(batches[0])
    timings = []
    for batch in batches:
        start = time.perf_counter()
        predict(batch)
        timings.append((time.perf_counter() - start, len(batch)))
    return timings


def log_and_register(
    cfg: TrimflowConfig, variant_dir: Path, store: Path, objective: float, variant: str
) -> tuple[str, str]:
    """Log the variant as a pyfunc in a fresh sqlite store under `store` and register it;
    returns (tracking URI, `models:/...@champion` URI)."""
    uri = f"sqlite:///{store / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("serving-bench", (store / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        info = log_variant_model(variant_dir, max_length=cfg.model.max_length)
    name = registered_model_name(cfg.task.type)
    register_recommended(
        MlflowClient(uri), run.info.run_id, info.model_uri, name, objective, variant
    )
    return uri, champion_uri(cfg.task.type)


def row_scores(row: dict) -> list[float]:
    """The label's score, or each entity's."""
    return [row["score"]] if "score" in row else [entity["score"] for entity in row["entities"]]


def prediction_differences(served: list[dict], local: list[dict]) -> dict:
    """Rows the server answered differently from the in-process pyfunc, and the largest gap
    between corresponding scores (rows with as many entities on both sides)."""
    pairs = list(zip(served, local, strict=True))
    gaps = [
        abs(a - b)
        for first, second in pairs
        if len(row_scores(first)) == len(row_scores(second))
        for a, b in zip(row_scores(first), row_scores(second), strict=True)
    ]
    return {
        "rows": len(pairs),
        "rows_different": sum(first != second for first, second in pairs),
        "max_score_gap": max(gaps, default=0.0),
    }


def time_paths(
    cfg: TrimflowConfig,
    model,
    inputs: TestInputs,
    texts: list[list[str]],
    pyfunc,
    server: ScoringServer,
    rounds: int,
) -> dict[str, list]:
    """(seconds, batch size) of evaluate's forwards over its throughput batches, and of the
    in-process pyfunc and the server over `texts`, the same test rows, in alternating rounds
    (so drift in the machine's speed affects all three alike)."""
    ev = cfg.evaluate
    timings = {"evaluate": [], "pyfunc": [], "served": []}
    for _ in track(range(rounds), description="timing rounds", console=CONSOLE):
        timings["evaluate"] += timed_forwards(
            model, inputs.throughput_batches, ev.throughput.warmup, len(texts), ev.num_threads
        )
        with torch_threads(ev.num_threads):
            timings["pyfunc"] += timed_text_calls(pyfunc.predict, texts)
        timings["served"] += timed_text_calls(server.predict, texts)
    return timings


def print_results(results: dict, out: str) -> None:
    throughput = results["throughput_texts_per_s"]
    table = Table(title=f"serving {results['variant']} at batch {results['batch_size']} ({out})")
    for column in ("path", "texts/s", "evaluate / this"):
        table.add_column(column)
    for name, value in throughput.items():
        table.add_row(name, f"{value:.1f}", f"{throughput['evaluate'] / value:.2f}x")
    Console().print(table)
    Console().print(
        f"target: evaluate / served <= {TARGET_RATIO}x; served vs in-process on the test split: "
        f"{results['predictions']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", help="a variant under models/ (default: the recommended)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    parser.add_argument("--out", default="reports/serving_bench.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg, layout = load_params(), dvc_layout()
    variant, variant_dir = bench_variant_dir(layout, args.variant)
    ev = cfg.evaluate
    batch_size = throughput_batch_size(ev)

    labels = read_label_map(layout.finetuned)["labels"]
    data = inference_data(layout, ev.batch_size)
    inputs = build_test_inputs(data, cfg)
    model = load_variant(variant_dir, num_threads=ev.num_threads)
    with torch_threads(ev.num_threads):
        scored = make_scorer(cfg, layout, labels).score(model, inputs.sorted_batches, inputs.order)
    test_batches = chunks(split_texts(layout.prepared, "test", cfg.task.type), batch_size)

    with tempfile.TemporaryDirectory(prefix="trimflow-serving-") as tmp:
        store = Path(tmp)
        objective = scored[cfg.task.metric]
        tracking, model_uri = log_and_register(cfg, variant_dir, store, objective, variant)
        pyfunc = mlflow.pyfunc.load_model(model_uri)
        CONSOLE.print(f"serving {model_uri} ({variant_dir}) on 127.0.0.1")
        with ScoringServer(model_uri, tracking, store / "server") as server:
            timed_texts = test_batches[: len(inputs.throughput_batches)]
            timings = time_paths(cfg, model, inputs, timed_texts, pyfunc, server, args.rounds)
            served = [row for batch in test_batches for row in server.predict(batch)]
        with torch_threads(ev.num_threads):
            local = [row for batch in test_batches for row in pyfunc.predict(batch)]

    throughput = {name: throughput_summary(t)["throughput_sps"] for name, t in timings.items()}
    equality = prediction_differences(served, local)
    if cfg.task.type == "classification":
        served_ids = [labels.index(row["label"]) for row in served]
        with torch_threads(ev.num_threads):
            same_batches = predict_logits(model, file_order_batches(data, batch_size)).argmax(-1)
        equality["labels_different_from_the_variant_on_the_same_batches"] = int(
            (same_batches != served_ids).sum()
        )
        equality["labels_different_from_evaluate_sorted_batches"] = int(
            (np.array(scored["predictions"]) != served_ids).sum()
        )
    results = {
        "variant": variant,
        "task": cfg.task.type,
        cfg.task.metric: objective,
        "batch_size": batch_size,
        "texts_timed_per_round": sum(
            len(batch["input_ids"]) for batch in inputs.throughput_batches
        ),
        "rounds": args.rounds,
        "throughput_texts_per_s": throughput,
        "evaluate_over_served": throughput["evaluate"] / throughput["served"],
        "target_ratio_at_most": TARGET_RATIO,
        "predictions": equality,
        "environment": {**environment(), "num_threads": ev.num_threads},
    }
    write_json(args.out, results)
    print_results(results, args.out)


if __name__ == "__main__":
    main()
