"""Serving under load: `trimflow serve` (micro-batching) against `mlflow models serve`, the same
champion, 16 concurrent clients sending one text per request.

    python bench/serve_load_bench.py [--variant NAME] [--clients 16] [--requests 3000]
        [--seconds 120] [--rounds 2] [--out reports/serve_load_bench.json]

Run after the pipeline, from the project root, alone on the machine. The variant (default: the
one reports/metrics.json recommends) is logged as a pyfunc in a temporary MLflow store and
registered as the champion of `trimflow-<task>`; both servers serve that `models:/` URI on
127.0.0.1 with their defaults (mlflow: one worker; trimflow: conf/serve, no rate limit). Both run
side by side; in alternating rounds each gets the same closed-loop load (`serving/loadgen.py`):
the test split's texts in file order, at most `requests / rounds` requests or
`seconds / rounds` seconds a round. Reported per server: texts/s, latency p50/p90/p99, failures,
and for trimflow the micro-batches it formed (its /metrics histogram). Every answer is checked
against the in-process pyfunc predicting its text alone: a lost answer is a failure, a mis-routed
one a different label. (A dynamic int8 variant quantizes activations with ranges of the whole
batch, so a text batched with others can score slightly differently: the largest score gap is
reported, and label differences are listed with the text's in-process margin.)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import tempfile
from pathlib import Path

import mlflow
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table
from serving_bench import log_and_register
from variant_inputs import bench_variant_dir

from trimflow.config.loading import load_params
from trimflow.evaluation.machine import environment
from trimflow.layout import dvc_layout
from trimflow.monitoring.profile import split_texts
from trimflow.serving.loadgen import LoadRun, run_load, wrong_answers
from trimflow.serving.server import LocalServer, ScoringServer, TrimflowServer
from trimflow.utils.atomic import write_json

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
TARGET_RATIO = 3.0  # trimflow's texts/s over mlflow's, at least; and a lower p99
WARMUP_REQUESTS = 64
BATCH_HISTOGRAM = "trimflow_batch_texts"
CONSOLE = Console(stderr=True)


def batch_histogram(server: TrimflowServer, token: str) -> dict[str, float]:
    """The service's micro-batch histogram: cumulative bucket counts by `le`, `sum`, `count`."""
    status, text = server.get("/metrics", token)
    if status != 200:
        raise SystemExit(f"GET /metrics answered {status}: {text[:500]}")
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == BATCH_HISTOGRAM]
    return {
        sample.labels.get("le", sample.name.removeprefix(f"{BATCH_HISTOGRAM}_")): sample.value
        for sample in family.samples
        if sample.name != f"{BATCH_HISTOGRAM}_created"
    }


def batches_formed(before: dict[str, float], after: dict[str, float]) -> dict:
    """Micro-batches formed between two histogram readings: count, mean texts, and how many
    held at most each bucket's texts."""
    grown = {key: after[key] - before.get(key, 0.0) for key in after}
    return {
        "batches": int(grown["count"]),
        "mean_texts": grown["sum"] / grown["count"] if grown["count"] else None,
        "at_most": {le: int(grown[le]) for le in after if le not in ("sum", "count")},
    }


def answer_check(runs: list[LoadRun], expected: dict[str, dict]) -> dict:
    """Lost answers, label differences (with the text's in-process label and score) and the
    largest score gap against the in-process predictions of each text alone."""
    exchanges = [exchange for run in runs for exchange in run.exchanges]
    different = wrong_answers(exchanges, lambda text, row: row["label"] == expected[text]["label"])
    gaps = [
        abs(row["score"] - expected[text]["score"])
        for exchange in exchanges
        if exchange.status == 200
        for text, row in zip(exchange.texts, exchange.predictions, strict=True)
        if row["label"] == expected[text]["label"]
    ]
    return {
        "texts_sent": sum(len(exchange.texts) for exchange in exchanges),
        "lost": sum(exchange.status != 200 for exchange in exchanges),
        "label_different": [
            {
                "text": exchange.texts[index][:80],
                "served": exchange.predictions[index] if index >= 0 else None,
                "alone": expected[exchange.texts[index]] if index >= 0 else None,
            }
            for exchange, index in different
        ],
        "max_score_gap": max(gaps, default=0.0),
    }


def measure(
    servers: dict[str, LocalServer], texts: list[str], token: str, args: argparse.Namespace
) -> dict[str, list[LoadRun]]:
    """Alternating rounds of the same load on each server."""
    runs: dict[str, list[LoadRun]] = {name: [] for name in servers}
    for round_ in range(args.rounds):
        for name, server in servers.items():
            CONSOLE.print(f"round {round_ + 1}/{args.rounds}: {name}, {args.clients} clients")
            runs[name].append(
                run_load(
                    server.url,
                    texts,
                    args.clients,
                    args.requests // args.rounds,
                    args.seconds / args.rounds,
                    token=token,
                )
            )
    return runs


def combined(runs: list[LoadRun]) -> dict:
    """One summary of several rounds (their exchanges and wall times together)."""
    return LoadRun(
        [exchange for run in runs for exchange in run.exchanges], sum(run.wall_s for run in runs)
    ).summary()


def print_results(results: dict, out: str) -> None:
    table = Table(
        title=f"serving {results['variant']}: {results['clients']} clients, one text each ({out})"
    )
    for column in ("server", "texts/s", "p50 ms", "p99 ms", "failures", "label diffs"):
        table.add_column(column)
    for name, summary in results["servers"].items():
        table.add_row(
            name,
            f"{summary['texts_per_s']:.1f}",
            f"{summary['p50_ms']:.1f}",
            f"{summary['p99_ms']:.1f}",
            str(sum(summary["failures_by_status"].values())),
            str(len(results["answers"][name]["label_different"])),
        )
    Console().print(table)
    batches = results["trimflow_batches"]
    Console().print(
        f"trimflow/mlflow: {results['throughput_ratio']:.2f}x texts/s (target >= {TARGET_RATIO}x),"
        f" p99 {results['p99_ratio']:.2f}x; {batches['batches']} micro-batches of "
        f"{batches['mean_texts']:.1f} texts on average"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", help="a variant under models/ (default: the recommended)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=3000, help="requests a server, at most")
    parser.add_argument("--seconds", type=float, default=120, help="seconds a server, at most")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument(
        "--set", nargs="*", default=[], help="serve settings for trimflow, e.g. serve.max_batch=8"
    )
    parser.add_argument("--out", default="reports/serve_load_bench.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg, layout = load_params(overrides=args.set), dvc_layout()
    variant, variant_dir = bench_variant_dir(layout, args.variant)
    metrics = json.loads(layout.metrics_file.read_text())
    objective = metrics["variants"][variant][cfg.task.metric]
    texts = split_texts(layout.prepared, "test", cfg.task.type)
    token = secrets.token_urlsafe(32)

    with tempfile.TemporaryDirectory(prefix="trimflow-serve-load-") as tmp:
        store = Path(tmp)
        tracking, model_uri = log_and_register(cfg, variant_dir, store, objective, variant)
        model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
        expected = {text: model.predict_texts([text])[0] for text in dict.fromkeys(texts)}
        CONSOLE.print(f"serving {model_uri} ({variant_dir}) twice on 127.0.0.1")
        env = {"MLFLOW_TRACKING_URI": tracking, "TRIMFLOW_SERVE_TOKEN": token}
        arguments = ["--model", model_uri, "--params", str(Path("params.yaml").resolve())]
        with (
            ScoringServer(model_uri, tracking, store / "mlflow") as mlflow_server,
            TrimflowServer(
                store / "trimflow", [*arguments, "serve.rate_limit=null", *args.set], env
            ) as ours,
        ):
            ours.wait_until_ready(token)
            servers = {"mlflow": mlflow_server, "trimflow": ours}
            for server in servers.values():  # warm-up
                run_load(server.url, texts, args.clients, WARMUP_REQUESTS, token=token)
            before = batch_histogram(ours, token)
            runs = measure(servers, texts, token, args)
            batches = batches_formed(before, batch_histogram(ours, token))

    summaries = {name: combined(server_runs) for name, server_runs in runs.items()}
    results = {
        "variant": variant,
        "model_uri": model_uri,
        "clients": args.clients,
        "rounds": args.rounds,
        "servers": summaries,
        "throughput_ratio": summaries["trimflow"]["texts_per_s"]
        / summaries["mlflow"]["texts_per_s"],
        "p99_ratio": summaries["trimflow"]["p99_ms"] / summaries["mlflow"]["p99_ms"],
        "target_ratio_at_least": TARGET_RATIO,
        "trimflow_batches": batches,
        "trimflow_serve": {**cfg.serve.model_dump(), "rate_limit": None},
        "answers": {name: answer_check(runs[name], expected) for name in runs},
        "environment": environment(),
    }
    write_json(args.out, results)
    print_results(results, args.out)


if __name__ == "__main__":
    main()
