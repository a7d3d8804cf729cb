"""CPU runtimes for one encoder: torch, ONNX Runtime and OpenVINO, fp32 and int8, at batch 1 and
batch 32, timed in interleaved rounds of one run; each against torch fp32 of the same run.

    python bench/runtime_bench.py [--model DIR] [--threads 2] [--rounds 5]
                                  [--out reports/runtime_bench.json]

Runtimes, each built as the quantize stage builds it (compress/variants.py):

1. torch fp32 and torch dynamic int8 (`dynamic_int8`: torch.ao, per-channel Linear weights);
2. ONNX Runtime fp32 (`onnx_fp32`) and dynamic int8 (`onnx_dynamic_int8`);
3. OpenVINO fp32 (`openvino_fp32`) and NNCF int8 (`openvino_int8`, calibrated on
   `quantize.calibration_batches` R8 validation batches);
4. CTranslate2 fp32 and int8 (BERT encoders only), where `ctranslate2` is importable: it is not
   a trimflow dependency (`pip install ctranslate2`). Its encoder gives the pooled output; the
   model's classifier is applied to it in numpy.

The model: `--model DIR` (a torch variant directory), else the pipeline's models/distilled if it
exists, else the packaged MiniLM with a fresh 8-label head (random head weights change nothing
in speed). Inputs are evaluate's (`build_test_inputs` with the default `evaluate` settings):
batch-1 latency over the first `evaluate.latency.samples` R8 test texts, texts/s over
`evaluate.throughput.repeats` batches of 32 in file order, truncated to `model.max_length`
tokens. The logit column is each runtime's largest |logit - torch fp32 logit| on the first
batch of 32. Run it alone on the machine: other load skews every runtime, though interleaving
spreads it over all of them.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import types
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path

import datasets
import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from transformers import DataCollatorWithPadding

from trimflow.compress.onnx import ExportedClassifier
from trimflow.compress.quantize import quantize_model
from trimflow.compress.variants import (
    EXPORTED_VARIANT_BUILDERS,
    load_variant,
    variant_runtime,
)
from trimflow.config.loading import compose_config
from trimflow.config.schemes import QUANTIZE_SCHEMES
from trimflow.data.sources import load_raw_splits
from trimflow.evaluation.benchmark import (
    latency_and_throughput_timings,
    latency_summary,
    throughput_summary,
)
from trimflow.evaluation.inputs import build_test_inputs
from trimflow.evaluation.machine import environment, has_int8_dot_product
from trimflow.layout import dvc_layout, read_label_map
from trimflow.models.loading import load_base_classifier, load_tokenizer, save_model_dir
from trimflow.utils.atomic import write_json
from trimflow.utils.quiet import quiet_third_party

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
BASELINE = "torch fp32"
THROUGHPUT_BATCH = 32
# Runtime label -> the quantize scheme that builds it (None: the source model itself).
SCHEMES = {
    BASELINE: None,
    "torch int8": "dynamic_int8",
    "onnxruntime fp32": "onnx_fp32",
    "onnxruntime int8": "onnx_dynamic_int8",
    "openvino fp32": "openvino_fp32",
    "openvino int8": "openvino_int8",
}
CT2_COMPUTE_TYPES = {"ctranslate2 fp32": "float32", "ctranslate2 int8": "int8"}
VERSIONED = ("onnxruntime", "openvino", "nncf", "ctranslate2", "transformers")


class CTranslate2Classifier(ExportedClassifier):
    """A BERT classifier whose encoder and pooler run in CTranslate2 and whose head (dropout is
    the identity at inference) runs in numpy on the pooled output."""

    def __init__(self, path: Path, head: nn.Linear, num_threads: int, compute_type: str) -> None:
        import ctranslate2

        self.storage = ctranslate2.StorageView
        self.encoder = ctranslate2.Encoder(
            str(path), "cpu", compute_type=compute_type, intra_threads=num_threads
        )
        self.weight = head.weight.detach().numpy().T.copy()
        self.bias = head.bias.detach().numpy().copy()
        self.input_names = ["input_ids", "attention_mask", "token_type_ids"]

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        lengths = feed["attention_mask"].sum(axis=1).astype(np.int32)  # right padding
        output = self.encoder.forward_batch(
            self.storage.from_array(feed["input_ids"].astype(np.int32)),
            self.storage.from_array(lengths),
            token_type_ids=feed["token_type_ids"].tolist(),
        )
        return np.asarray(output.pooler_output) @ self.weight + self.bias


def ctranslate2_models(
    model: nn.Module, work: Path, num_threads: int
) -> tuple[dict[str, CTranslate2Classifier], str | None]:
    """CTranslate2 fp32 and int8 of a BERT classifier, or none and why not."""
    try:
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        return {}, "ctranslate2 is not installed (pip install ctranslate2)"
    if model.config.model_type != "bert" or not hasattr(model, "bert"):
        return {}, f"{model.config.model_type}: CTranslate2 converts BERT encoders only here"
    encoder_dir = work / "ct2-encoder"
    model.bert.save_pretrained(encoder_dir)
    models = {}
    for label, compute_type in CT2_COMPUTE_TYPES.items():
        out = work / f"ct2-{compute_type}"
        quantization = None if compute_type == "float32" else compute_type
        TransformersConverter(str(encoder_dir)).convert(str(out), quantization=quantization)
        models[label] = CTranslate2Classifier(out, model.classifier, num_threads, compute_type)
    return models, None


def source_model(cfg, requested: Path | None) -> tuple[Path | None, str]:
    """(a torch variant directory or None for the packaged model, what the model is)."""
    if requested is not None:
        if variant_runtime(requested) != "torch":
            raise SystemExit(f"{requested}: --model takes a torch variant directory")
        return requested, str(requested)
    distilled = dvc_layout().model_dir("distilled")
    if (distilled / "config.json").is_file():
        return distilled, f"{distilled} (the pipeline's distilled student)"
    return None, f"{cfg.model.name} with a fresh 8-label head (no pipeline model found)"


def r8_inputs(cfg, tokenizer):
    """evaluate's test inputs over the R8 test split, and the calibration batches the quantize
    stage takes (the first `quantize.calibration_batches` validation batches)."""
    splits = load_raw_splits(cfg.dataset)
    collator = DataCollatorWithPadding(tokenizer)

    def tokenized(texts: list[str]) -> datasets.Dataset:
        encoded = tokenizer(texts, truncation=True, max_length=cfg.model.max_length)
        return datasets.Dataset.from_dict(dict(encoded))

    test = tokenized(list(splits["test"]["text"]))
    inputs = build_test_inputs(types.SimpleNamespace(splits={"test": test}, collator=collator), cfg)
    size = cfg.finetune.eval_batch_size
    texts = list(splits["validation" if "validation" in splits else "train"]["text"])
    rows = tokenized(texts[: size * cfg.quantize.calibration_batches])
    calibration = [
        collator([rows[i] for i in range(start, min(start + size, len(rows)))])
        for start in range(0, len(rows), size)
    ]
    return inputs, calibration


def build_runtimes(
    source_dir: Path, calibration: list[dict], work: Path, num_threads: int
) -> tuple[dict[str, object], str | None]:
    """Every runtime's model, built from the torch variant in `source_dir` as the quantize stage
    builds its schemes, and why CTranslate2 is left out (None if it is not)."""
    model = load_variant(source_dir)
    models = {}
    for label, scheme in SCHEMES.items():
        if scheme is None:
            models[label] = model
        elif QUANTIZE_SCHEMES[scheme].runtime == "torch":
            models[label] = quantize_model(model, scheme)
        else:
            out = work / scheme
            out.mkdir()
            save = EXPORTED_VARIANT_BUILDERS[QUANTIZE_SCHEMES[scheme].runtime]
            save(model, source_dir, out, scheme, calibration[0], calibration)
            models[label] = load_variant(out, num_threads)
    extra, skipped = ctranslate2_models(model, work, num_threads)
    return {**models, **extra}, skipped


def max_logit_differences(models: dict, batch: dict) -> dict[str, float]:
    with torch.inference_mode():
        reference = models[BASELINE](**batch).logits.float()
        return {
            label: float((model(**batch).logits.float() - reference).abs().max())
            for label, model in models.items()
        }


def versions() -> dict[str, str | None]:
    found = {}
    for package in VERSIONED:
        try:
            found[package] = package_version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def print_results(results: dict) -> None:
    env = results["environment"]
    console = Console()
    console.print(
        f"CPU: {env['cpu_model']} ({', '.join(env['cpu_flags']) or 'no listed flags'}; "
        f"int8 dot product (VNNI/AMX): {'yes' if env['int8_dot_product'] else 'no'}), "
        f"{env['num_threads']} threads. Model: {results['model']}"
    )
    table = Table(title=f"runtimes against {BASELINE}, same run ({results['out']})")
    for column in (
        "runtime",
        "b=1 p50 ms",
        "x",
        f"b={THROUGHPUT_BATCH} texts/s",
        "x",
        "max |Δlogit|",
    ):
        table.add_column(column, justify="left" if column == "runtime" else "right")
    for label, row in results["runtimes"].items():
        table.add_row(
            label,
            f"{row['latency_ms_p50']:.2f}",
            f"{row['latency_speedup']:.2f}x",
            f"{row['throughput_sps']:.1f}",
            f"{row['throughput_speedup']:.2f}x",
            f"{row['max_abs_logit_diff']:.4f}",
        )
    console.print(table)
    if results["ctranslate2_skipped"]:
        console.print(f"CTranslate2 left out: {results['ctranslate2_skipped']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a torch variant directory to convert")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of every runtime")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--out", default="reports/runtime_bench.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    quiet_third_party()  # as the CLI: no progress bars, no ONNX Runtime quantization notices
    cfg = compose_config(["evaluate.throughput.batch_size=32"])
    ev = cfg.evaluate
    requested, described = source_model(cfg, args.model)
    with tempfile.TemporaryDirectory(prefix="trimflow-runtimes-") as tmp:
        work = Path(tmp)
        if requested is None:
            labels = sorted(load_raw_splits(cfg.dataset)["train"]["label"].unique())
            tokenizer = load_tokenizer(cfg.model.name)
            torch.manual_seed(0)
            model = load_base_classifier(cfg.model.name, labels).eval()
            requested = work / "source"
            save_model_dir(model, tokenizer, {"labels": labels}, requested)
        else:
            labels = read_label_map(requested)["labels"]
            tokenizer = load_tokenizer(str(requested))
        inputs, calibration = r8_inputs(cfg, tokenizer)
        models, ct2_skipped = build_runtimes(requested, calibration, work, args.threads)
        differences = max_logit_differences(models, inputs.throughput_batches[0])
        (latency, _), (throughput, _) = latency_and_throughput_timings(
            models, inputs.latency_inputs, inputs.throughput_batches, ev, args.rounds, args.threads
        )
    rows = {
        label: {
            "scheme": SCHEMES.get(label, CT2_COMPUTE_TYPES.get(label)),
            **latency_summary(latency[label]),
            **throughput_summary(throughput[label]),
            "max_abs_logit_diff": differences[label],
        }
        for label in models
    }
    base = rows[BASELINE]
    for row in rows.values():
        row["latency_speedup"] = base["latency_ms_p50"] / row["latency_ms_p50"]
        row["throughput_speedup"] = row["throughput_sps"] / base["throughput_sps"]
    results = {
        "model": described,
        "out": args.out,
        "settings": {
            "threads": args.threads,
            "rounds": args.rounds,
            "latency_samples": len(inputs.latency_inputs),
            "latency_warmup": ev.latency.warmup,
            "latency_repeats": ev.latency.repeats,
            "throughput_batch": THROUGHPUT_BATCH,
            "throughput_batches": len(inputs.throughput_batches),
            "throughput_repeats": ev.throughput.repeats,
            "max_length": cfg.model.max_length,
            "calibration_batches": len(calibration),
        },
        "runtimes": rows,
        "ctranslate2_skipped": ct2_skipped,
        "environment": {
            **environment(),
            "num_threads": args.threads,
            "int8_dot_product": has_int8_dot_product(),
            **versions(),
        },
    }
    write_json(args.out, results)
    print_results(results)


if __name__ == "__main__":
    main()
