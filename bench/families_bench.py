"""Every encoder family through the smoke pipeline: how much smaller and faster its pruned and
distilled variants are than its fine-tuned model, measured in the same evaluate run.

    python bench/families_bench.py [--families bert,roberta,...] [--layers 4] [--hidden 256]
                                   [--out reports/families_bench.json]

Each family gets a random encoder of the given shape built from its config, with a tokenizer of
its kind (the builders the tests use, tests/families.py: no download), and runs
`experiment=smoke` in process on R8 (240 training documents) with the structured `pruned`
(half the heads and FFN neurons), the `distilled` student (half the layers) and their ONNX
int8 forms. Random weights: the quality columns say nothing; sizes and batch-1 latencies are
what this compares, each variant against its own family's fine-tuned model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from trimflow.config.loading import compose_config
from trimflow.evaluation.machine import environment
from trimflow.layout import dvc_layout
from trimflow.pipeline import run_pipeline
from trimflow.utils.atomic import write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from families import FAMILIES, save_tiny_encoder  # noqa: E402

COMPARED = ("pruned", "distilled", "pruned_onnx_int8", "distilled_onnx_int8")
# Only the variants compared, and the fine-tuned model they are compared with.
LEAN = (
    "~adapt.variants",
    "+adapt.variants={}",
    "~prune.variants.sparse80",
    "~quantize.variants",
    "+quantize.variants={pruned_onnx_int8:{source:pruned,scheme:onnx_dynamic_int8},"
    "distilled_onnx_int8:{source:distilled,scheme:onnx_dynamic_int8}}",
    "tracking.enabled=false",
    # More timed rounds than the smoke preset's: tiny models' latencies are a few milliseconds.
    "evaluate.rounds=5",
    "evaluate.latency.samples=16",
    "evaluate.latency.repeats=10",
)


def measure(family: str, root: Path, shape: dict[str, int]) -> dict[str, dict]:
    """The family's smoke run: size and batch-1 latency of every variant, and their ratios."""
    encoder = save_tiny_encoder(family, root / "encoder", **shape)
    cfg = compose_config(["experiment=smoke", f"model.name={encoder}", *LEAN])
    layout = dvc_layout(root)
    run_pipeline(cfg, layout)
    variants = json.loads(layout.metrics_file.read_text())["variants"]
    base = variants["finetuned"]
    return {
        name: {
            "params": variants[name]["params"],
            "size_mb": variants[name]["size_mb"],
            "latency_ms_p50": variants[name]["latency_ms_p50"],
            "smaller": base["size_mb"] / variants[name]["size_mb"],
            "faster": base["latency_ms_p50"] / variants[name]["latency_ms_p50"],
        }
        for name in ("finetuned", *COMPARED)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("reports/families_bench.json"))
    args = parser.parse_args()
    shape = dict(layers=args.layers, hidden=args.hidden, heads=4, ffn=4 * args.hidden)
    results = {}
    for family in args.families.split(","):
        with tempfile.TemporaryDirectory(prefix=f"families-{family}-") as tmp:
            results[family] = measure(family, Path(tmp), shape)
    table = Table(title=f"smaller / faster at batch 1 than the family's fine-tuned model {shape}")
    table.add_column("family")
    table.add_column("fine-tuned MB / p50 ms", justify="right")
    for name in COMPARED:
        table.add_column(name, justify="right")
    for family, variants in results.items():
        base = variants["finetuned"]
        table.add_row(
            family,
            f"{base['size_mb']:.2f} / {base['latency_ms_p50']:.2f}",
            *(f"{variants[n]['smaller']:.2f}x / {variants[n]['faster']:.2f}x" for n in COMPARED),
        )
    Console().print(table)
    write_json(args.out, {"environment": environment(), "shape": shape, "families": results})


if __name__ == "__main__":
    main()
