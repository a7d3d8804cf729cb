"""Command line: `trimflow <stage>` for DVC, `trimflow pipeline` for Hydra runs and sweeps."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from trimflow.explain import METHODS
from trimflow.layout import STAGES, VARIANT_STAGES, dvc_layout, unit_name
from trimflow.utils.distributed import is_main_process
from trimflow.utils.interrupt import StageInterrupted, naming_stage, signals_raise
from trimflow.utils.quiet import quiet_third_party

log = logging.getLogger("trimflow")


def _setup_environment() -> None:
    for key, value in (
        ("DVC_NO_ANALYTICS", "1"),
        ("MLFLOW_DISABLE_TELEMETRY", "true"),
        ("TOKENIZERS_PARALLELISM", "false"),
        ("HF_HUB_DISABLE_TELEMETRY", "1"),
    ):
        os.environ.setdefault(key, value)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    quiet_third_party()


def run_dvc_stage(name: str, params: str, variant: str | None) -> None:
    """Run one stage on params.yaml with the fixed DVC layout."""
    from trimflow.config.loading import load_params
    from trimflow.layout import dvc_layout
    from trimflow.stages import run_stage

    run_stage(name, load_params(params), dvc_layout(), variant)


def team_command(args: argparse.Namespace) -> int:
    """`trimflow team up|down`: start or stop PostgreSQL, S3 and mlflow server locally."""
    from pathlib import Path

    from trimflow.tracking.team import CLIENT_FILE, down, up

    folder = Path(args.dir)
    if args.action == "down":
        down(folder)
        log.info("team stack stopped")
        return 0
    state = up(folder, args.port)
    log.info(
        "team stack up: mlflow server %s on PostgreSQL (port %d) and S3 (%s); logs in %s",
        state["uri"],
        state["postgres"]["port"],
        state["s3"]["endpoint"],
        folder,
    )
    log.info(
        "client settings: source %s  (then make run, or trimflow pipeline tracking=server)",
        folder / CLIENT_FILE,
    )
    return 0


def _add_compare_parser(commands: argparse._SubParsersAction) -> None:
    """`trimflow compare [RUN ...] [--latest-pipeline | --sweep] [options]`."""
    from trimflow.tracking.compare import metric_list
    from trimflow.tracking.compare_query import DEFAULT_EXPERIMENT

    sub = commands.add_parser("compare", help="compare MLflow runs: params, metrics, ratios")
    sub.add_argument(
        "runs", nargs="*", help="run ids or names (default: variants of the latest pipeline run)"
    )
    mode = sub.add_mutually_exclusive_group()
    mode.add_argument(
        "--latest-pipeline", action="store_true", help="variants of the latest pipeline run"
    )
    mode.add_argument("--sweep", action="store_true", help="pipeline runs of the latest sweep")
    sub.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    sub.add_argument("--baseline", help="run name, id or variant (default: finetuned or first)")
    sub.add_argument("--metrics", type=metric_list, help="comma-separated metric names")
    sub.add_argument("--out", default="reports/compare")
    sub.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI, mlflow.db)")


def compare_runs(args: argparse.Namespace) -> int:
    """Print the comparison of MLflow runs and write it to `args.out`; 2 when a run is missing."""
    from rich.console import Console

    from trimflow.tracking.compare import CompareError
    from trimflow.tracking.compare_query import compare
    from trimflow.tracking.compare_render import rich_report, write_outputs

    try:
        comparison = compare(
            args.uri,
            args.experiment,
            args.runs,
            latest_pipeline=args.latest_pipeline,
            sweep=args.sweep,
            baseline=args.baseline,
            metrics=args.metrics,
        )
    except CompareError as err:
        log.error("%s", err)
        return 2
    Console().print(*rich_report(comparison))
    for path in write_outputs(comparison, args.out):
        log.info("wrote %s", path)
    return 0


def serve_command(args: argparse.Namespace) -> int:
    """`trimflow serve`: serve until SIGTERM or SIGINT (0); 2 when the model cannot be loaded."""
    from trimflow.config.loading import load_params
    from trimflow.serving.loading import ModelLoadError
    from trimflow.serving.service import serve

    try:
        serve(load_params(args.params, args.overrides), args.model, args.variant)
    except ModelLoadError as err:
        log.error("%s", err)
        return 2
    return 0


def predict_command(args: argparse.Namespace) -> int:
    """`trimflow predict`: 0 when the file was scored (bad rows reported), 2 when no row could
    be scored or the model cannot be loaded."""
    from pathlib import Path

    from trimflow.config.loading import load_params
    from trimflow.serving.batch_predict import predict
    from trimflow.serving.loading import ModelLoadError
    from trimflow.serving.pyfunc import BATCH_SIZE

    cfg = load_params(args.params, args.overrides)
    try:
        summary = predict(
            cfg,
            Path(args.input),
            Path(args.output),
            args.model,
            args.variant,
            args.text_column,
            args.batch_size or BATCH_SIZE,
        )
    except ModelLoadError as err:
        log.error("%s", err)
        return 2
    if summary.scored == 0:
        log.error(
            "no row of %s could be scored: see the error column of %s", args.input, args.output
        )
        return 2
    return 0


def positive_int(text: str) -> int:
    """An argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _add_model_source(sub: argparse.ArgumentParser, verb: str) -> None:
    """`--model URI | --variant NAME`, as `trimflow serve` and `trimflow predict` take them."""
    source = sub.add_mutually_exclusive_group()
    source.add_argument(
        "--model", help="MLflow model URI (default: models:/trimflow-<task>@champion)"
    )
    source.add_argument("--variant", help=f"{verb} models/VARIANT of this project instead")


def read_text_lines(path: str) -> list[str]:
    """The non-blank lines of a UTF-8 file; `DataError` naming it when it cannot be read or
    holds no text."""
    from pathlib import Path

    from trimflow.data.errors import DataError

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read it as UTF-8 text ({err})") from None
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise DataError(f"{path}: holds no text (one text a line)")
    return texts


def explain_command(args: argparse.Namespace) -> int:
    """`trimflow explain`: 0 when the explanations were written, 2 (nothing written) for an
    unreadable --input, an empty or too long text, or a variant it cannot explain."""
    from pathlib import Path

    from mlflow.exceptions import MlflowException

    from trimflow.config.loading import load_params
    from trimflow.explain.attribution import ExplainError, explain_texts
    from trimflow.explain.render import write_explanations
    from trimflow.serving.loading import model_source

    texts = [args.text] if args.input is None else read_text_lines(args.input)
    source = model_source(load_params(args.params), None, args.variant)
    try:
        explanations = explain_texts(source.load(), texts, args.method)
    except ExplainError as err:
        log.error("%s: %s", source.name, err)
        return 2
    except MlflowException as err:  # a bad text
        log.error("%s: %s", args.input or "--text", err.message)
        return 2
    for path in write_explanations(Path(args.out), source.name, explanations):
        log.info("wrote %s", path)
    return 0


def monitor_command(args: argparse.Namespace) -> int:
    """`trimflow monitor`: 0 no drift, 1 drift, 2 bad input (monitoring/monitor.py)."""
    from pathlib import Path

    from trimflow.config.loading import load_params
    from trimflow.monitoring.monitor import run_monitor

    cfg = load_params(args.params, args.overrides).monitor
    return run_monitor(cfg, Path(args.log), Path(args.reference), Path(args.out))


def report_interruption(err: StageInterrupted, argv: list[str]) -> int:
    """Say which stage a signal stopped and how to continue; the exit status for it.

    Of the processes of data-parallel training only rank 0 says it."""
    if not is_main_process():
        return err.exit_code
    rerun = "dvc repro" if os.environ.get("DVC_STAGE") else shlex.join(["trimflow", *argv])
    log.error(
        "%s %s; nothing half-written was kept. Rerun `%s` to continue where it stopped.",
        err.stage or "trimflow",
        err,
        rerun,
    )
    return err.exit_code


def main(argv: list[str] | None = None) -> int:
    """`trimflow ...`: the exit status is 2 for bad config or data, 128 + n after signal n."""
    _setup_environment()
    argv = list(sys.argv[1:] if argv is None else argv)
    with signals_raise():
        try:
            return run_command(argv)
        except StageInterrupted as err:
            return report_interruption(err, argv)


def build_parser() -> argparse.ArgumentParser:
    """The `trimflow` argument parser, every command but `pipeline`'s arguments (Hydra parses
    those); `trimflow.reference` renders the CLI reference from it."""
    parser = argparse.ArgumentParser(prog="trimflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        sub = commands.add_parser(stage, help=f"run the {stage} stage on params.yaml")
        sub.add_argument("--params", default="params.yaml")
        if stage in VARIANT_STAGES:
            sub.add_argument("--variant", help="build only this declared variant (default: all)")
    params = commands.add_parser("params", help="compose conf/ into params.yaml")
    params.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=smoke")
    params.add_argument("--out", default="params.yaml")
    repro = commands.add_parser("repro", help="`dvc repro` under one MLflow parent run")
    repro.add_argument("dvc_args", nargs=argparse.REMAINDER)
    commands.add_parser("pipeline", help="all stages in-process via Hydra (supports -m sweeps)")
    _add_compare_parser(commands)
    team = commands.add_parser("team", help="a local team tracking stack: up | down")
    team.add_argument("action", choices=["up", "down"])
    team.add_argument("--dir", default=".team", help="state, logs and client settings")
    team.add_argument("--port", type=int, default=5000, help="mlflow server port")
    serve = commands.add_parser(
        "serve", help="an HTTP service of a model: micro-batching, metrics, a bearer token"
    )
    _add_model_source(serve, "serve")
    serve.add_argument("--params", default="params.yaml", help="settings: its serve section")
    serve.add_argument("overrides", nargs="*", help="settings over --params, e.g. serve.port=9000")
    predict = commands.add_parser(
        "predict", help="score a csv, jsonl or parquet file into another, bad rows reported"
    )
    predict.add_argument("--input", required=True, help="FILE.csv, .jsonl (.json) or .parquet")
    predict.add_argument("--output", required=True, help="FILE.csv, .jsonl (.json) or .parquet")
    _add_model_source(predict, "score with")
    predict.add_argument("--text-column", default="text", help="the column of texts")
    predict.add_argument(
        "--batch-size", type=positive_int, help="texts per forward pass (default: 32, as served)"
    )
    predict.add_argument(
        "--params", default="params.yaml", help="settings: task, model, tracking, evaluate"
    )
    predict.add_argument(
        "overrides", nargs="*", help="settings over --params, e.g. evaluate.num_threads=4"
    )
    monitor = commands.add_parser(
        "monitor", help="drift of a prediction log from the reference profile: exit 1 on drift"
    )
    monitor.add_argument("--log", required=True, help="the prediction log (JSON lines)")
    monitor.add_argument(
        "--reference", default=str(dvc_layout().reference_profile), help="evaluate's profile"
    )
    monitor.add_argument("--out", default="reports/monitor", help="monitor.json, monitor.html")
    monitor.add_argument("--params", default="params.yaml", help="settings: its monitor section")
    monitor.add_argument("overrides", nargs="*", help="e.g. monitor.psi_threshold=0.25")
    explain = commands.add_parser(
        "explain", help="word attributions of a variant's predicted labels: JSON and HTML"
    )
    explain.add_argument("--variant", required=True, help="explain models/VARIANT of this project")
    texts = explain.add_mutually_exclusive_group(required=True)
    texts.add_argument("--text", help="one text")
    texts.add_argument("--input", help="a UTF-8 file of texts, one a line")
    explain.add_argument(
        "--method",
        choices=METHODS,
        default="auto",
        help="ig: integrated gradients (torch variants), ablation: feature ablation (any "
        "variant), auto (default): ig where it can run",
    )
    explain.add_argument(
        "--out", default="reports/explain", help="explanations.json, explanations.html"
    )
    explain.add_argument("--params", default="params.yaml", help="settings: model.max_length")
    dag = commands.add_parser("dag", help="dvc.yaml's code deps from the imports of each stage")
    mode = dag.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="list wrong code deps; exit 1 if any")
    mode.add_argument("--write", action="store_true", help="rewrite the code deps in dvc.yaml")
    return parser


def run_command(argv: list[str]) -> int:
    """Parse `argv` and run the command."""
    if argv and argv[0] == "pipeline":
        from trimflow.pipeline import hydra_entry

        sys.argv = [f"{sys.argv[0]} pipeline", *argv[1:]]
        hydra_entry()
        return 0

    args = build_parser().parse_args(argv)

    from trimflow.config.loading import ConfigError
    from trimflow.data.sources import DataError
    from trimflow.tracking.runs import TrackingError
    from trimflow.tracking.team import StackError

    try:
        if args.command in STAGES:
            variant = getattr(args, "variant", None)
            with naming_stage(unit_name(args.command, variant)):
                run_dvc_stage(args.command, args.params, variant)
        elif args.command == "params":
            from trimflow.config.loading import write_params

            write_params(args.overrides, args.out)
            log.info("wrote %s", args.out)
        elif args.command == "compare":
            return compare_runs(args)
        elif args.command == "dag":
            from trimflow.dag import run_dag

            return run_dag(write=args.write)
        elif args.command == "team":
            return team_command(args)
        elif args.command == "serve":
            return serve_command(args)
        elif args.command == "predict":
            return predict_command(args)
        elif args.command == "monitor":
            return monitor_command(args)
        elif args.command == "explain":
            return explain_command(args)
        elif args.command == "repro":
            from trimflow.pipeline import dvc_repro

            return dvc_repro(args.dvc_args)
    except (ConfigError, DataError, TrackingError, StackError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
