"""Benchmarks that compare trimflow with a peer measured in the same run; prints ratios.

    python bench/run_bench.py [--steps 24] [--out reports/bench.json]

1. fine-tune samples/s: trimflow's Lightning loop vs a plain Hugging Face `Trainer`
   (same model, data, batch size, length grouping, dynamic padding, fp32, threads);
2. tokenize rate: the tokenize stage's batched `datasets.map` vs one raw batched tokenizer call;
3. batch-1 latency: dynamic int8 vs fp32 of the same model;
4. batch-1 latency: torch.ao dynamic int8 (the pipeline's) vs torchao
   `Int8DynamicActivationInt8WeightConfig`, eager, of the same model.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import logging
import os
import tempfile
import time
from pathlib import Path

import datasets
import torch
from rich.console import Console
from rich.table import Table

from trimflow.compress.quantize import quantize_dynamic_int8
from trimflow.config.loading import compose_config
from trimflow.data.datamodule import TokenizedDataModule
from trimflow.data.sources import load_raw_splits
from trimflow.data.tokenization import tokenize_split
from trimflow.evaluation.benchmark import (
    interleaved_timings,
    latency_summary,
    measure_latency,
)
from trimflow.evaluation.machine import environment
from trimflow.models.loading import load_base_classifier, load_tokenizer
from trimflow.models.module import ClassifierModule
from trimflow.models.training import resolve_precision
from trimflow.utils.atomic import write_json
from trimflow.utils.device import enable_tf32

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
TOKENIZE_REPEATS = 5
FINETUNE_ROUNDS = 2
TORCHAO_REPEATS = 100


def r8_dataset(cfg) -> tuple[datasets.Dataset, list[str]]:
    """The embedded R8 training split with integer labels."""
    train = load_raw_splits(cfg.dataset)["train"]
    labels = sorted(train["label"].unique())
    data = datasets.Dataset.from_dict(
        {
            "text": list(train["text"]),
            "label_id": [labels.index(label) for label in train["label"]],
        }
    )
    return data, labels


def best_seconds(work, repeats: int = TOKENIZE_REPEATS) -> float:
    """The fastest of `repeats` timed calls (the least disturbed by other load)."""
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        timings.append(time.perf_counter() - start)
    return min(timings)


def bench_tokenize(data: datasets.Dataset, tokenizer, max_length: int) -> dict:
    """Texts per second of the raw batched call and of the stage's map, best of 5 each."""
    texts = list(data["text"])
    raw = len(texts) / best_seconds(
        lambda: tokenizer(texts, truncation=True, max_length=max_length)
    )
    ours = len(texts) / best_seconds(lambda: tokenize_split(data, tokenizer, max_length))
    return {
        "trimflow_texts_per_s": ours,
        "raw_tokenizer_texts_per_s": raw,
        "ratio": ours / raw,
        "repeats": TOKENIZE_REPEATS,
    }


def trimflow_fit(
    cfg, labels, splits_dir: Path, tokenizer_dir: Path, callbacks=(), device: str = "cpu"
) -> None:
    """One epoch of trimflow's LightningModule and data module (no validation, no logging)
    on `device`, with the trainer settings the pipeline takes there (bf16-mixed, fused AdamW,
    padding to multiples of 8 and pinned memory on a GPU; `trainer.compile`)."""
    import lightning as L

    torch.manual_seed(0)
    module = ClassifierModule(
        load_base_classifier(cfg.model.name, labels),
        lr=cfg.finetune.lr,
        weight_decay=cfg.finetune.weight_decay,
        warmup_ratio=cfg.finetune.warmup_ratio,
    )
    on_gpu = device == "cuda"
    data = TokenizedDataModule(
        splits_dir,
        tokenizer_dir,
        batch_size=cfg.finetune.batch_size,
        eval_batch_size=cfg.finetune.batch_size,
        group_by_length=True,
        num_workers=cfg.trainer.num_workers,
        pad_to_multiple_of=8 if on_gpu else None,
        pin_memory=on_gpu,
    )
    if on_gpu:
        enable_tf32()
    if cfg.trainer.compile:
        module.model.compile()
    trainer = L.Trainer(
        accelerator="gpu" if on_gpu else "cpu",
        devices=1,
        precision=resolve_precision(cfg.trainer) if on_gpu else "32-true",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=list(callbacks),
    )
    trainer.fit(module, datamodule=data)


def hf_trainer_fit(
    cfg,
    labels,
    train: datasets.Dataset,
    tokenizer,
    output_dir: Path,
    callbacks=(),
    device: str = "cpu",
    defaults: bool = False,
) -> None:
    """One epoch of a Hugging Face Trainer: with trimflow's settings (length grouping), or
    with `defaults` its own (random order, fp32), on `device`."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    torch.manual_seed(0)
    settings = {} if defaults else {"train_sampling_strategy": "group_by_length"}
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.finetune.batch_size,
        num_train_epochs=1,
        learning_rate=cfg.finetune.lr,
        weight_decay=cfg.finetune.weight_decay,
        warmup_steps=cfg.finetune.warmup_ratio,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
        **settings,
    )
    Trainer(
        model=load_base_classifier(cfg.model.name, labels),
        args=args,
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=list(callbacks),
    ).train()


def bench_finetune(cfg, tokenized: datasets.Dataset, tokenizer, labels, steps: int) -> dict:
    """Samples/s of both trainers on the same `steps` batches, alternating, best of 2 each."""
    batch = cfg.finetune.batch_size
    train = tokenized.select(range(steps * batch))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        splits = {
            "train": train,
            "validation": train.select(range(batch)),
            "test": train.select(range(batch)),
        }
        datasets.DatasetDict(splits).save_to_disk(tmp / "splits")
        tokenizer.save_pretrained(tmp / "tokenizer")
        ours, theirs = [], []
        for _ in range(FINETUNE_ROUNDS):
            ours.append(
                best_seconds(
                    lambda: trimflow_fit(cfg, labels, tmp / "splits", tmp / "tokenizer"), 1
                )
            )
            theirs.append(
                best_seconds(lambda: hf_trainer_fit(cfg, labels, train, tokenizer, tmp / "hf"), 1)
            )
    samples = steps * batch
    return {
        "trimflow_samples_per_s": samples / min(ours),
        "hf_trainer_samples_per_s": samples / min(theirs),
        "ratio": min(theirs) / min(ours),
        "steps": steps,
        "batch_size": batch,
        "rounds": FINETUNE_ROUNDS,
    }


def latency_inputs(tokenized: datasets.Dataset, tokenizer, count: int = 32) -> list[dict]:
    """The first `count` training examples as padded single-example batches."""
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    columns = ("input_ids", "attention_mask", "token_type_ids")
    return [collate([{key: tokenized[i][key] for key in columns}]) for i in range(count)]


def bench_int8(model: torch.nn.Module, inputs: list[dict], num_threads: int) -> dict:
    """Batch-1 p50 latency of torch.ao dynamic int8 vs fp32."""
    settings = dict(warmup=10, repeats=100, num_threads=num_threads)
    fp32 = measure_latency(model, inputs, **settings)["latency_ms_p50"]
    int8 = measure_latency(quantize_dynamic_int8(model), inputs, **settings)["latency_ms_p50"]
    return {"fp32_latency_ms_p50": fp32, "int8_latency_ms_p50": int8, "speedup": fp32 / int8}


def bench_torchao(model: torch.nn.Module, inputs: list[dict], num_threads: int) -> dict:
    """Batch-1 p50 latency (eager) of torch.ao dynamic int8 vs torchao's int8 dynamic-activation
    int8-weight linears, interleaved in rounds; ratio > 1 means torch.ao is faster."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    torchao_model = copy.deepcopy(model).eval()
    quantize_(torchao_model, Int8DynamicActivationInt8WeightConfig())
    models = {"torch_ao": quantize_dynamic_int8(model), "torchao": torchao_model}
    timings, _ = interleaved_timings(
        models, inputs, warmup=10, repeats=TORCHAO_REPEATS, rounds=4, num_threads=num_threads
    )
    p50 = {name: latency_summary(timings[name])["latency_ms_p50"] for name in models}
    return {
        "torch_ao_latency_ms_p50": p50["torch_ao"],
        "torchao_latency_ms_p50": p50["torchao"],
        "ratio": p50["torchao"] / p50["torch_ao"],
        "torchao_version": importlib.metadata.version("torchao"),
        "repeats": TORCHAO_REPEATS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24, help="training steps per trainer")
    parser.add_argument("--out", default="reports/bench.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = compose_config()
    tokenizer = load_tokenizer(cfg.model.name)
    data, labels = r8_dataset(cfg)
    tokenized, _ = tokenize_split(data, tokenizer, cfg.model.max_length)
    model = load_base_classifier(cfg.model.name, labels).eval()
    inputs = latency_inputs(tokenized, tokenizer)
    results = {
        "tokenize": bench_tokenize(data, tokenizer, cfg.model.max_length),
        "finetune": bench_finetune(cfg, tokenized, tokenizer, labels, args.steps),
        "int8_latency": bench_int8(model, inputs, cfg.evaluate.num_threads),
        "torchao_int8_latency": bench_torchao(model, inputs, cfg.evaluate.num_threads),
        "environment": {**environment(), "num_threads": torch.get_num_threads()},
    }
    write_json(args.out, results)
    table = Table(title=f"trimflow benchmarks ({args.out})")
    for column in ("benchmark", "trimflow", "peer", "ratio", "target"):
        table.add_column(column)
    table.add_row(
        "fine-tune samples/s vs HF Trainer",
        f"{results['finetune']['trimflow_samples_per_s']:.1f}",
        f"{results['finetune']['hf_trainer_samples_per_s']:.1f}",
        f"{results['finetune']['ratio']:.2f}x",
        ">= 1.0x",
    )
    table.add_row(
        "tokenize texts/s vs raw tokenizer",
        f"{results['tokenize']['trimflow_texts_per_s']:.0f}",
        f"{results['tokenize']['raw_tokenizer_texts_per_s']:.0f}",
        f"{results['tokenize']['ratio']:.2f}x",
        ">= 0.8x",
    )
    table.add_row(
        "batch-1 p50 latency int8 vs fp32 (ms)",
        f"{results['int8_latency']['int8_latency_ms_p50']:.2f}",
        f"{results['int8_latency']['fp32_latency_ms_p50']:.2f}",
        f"{results['int8_latency']['speedup']:.2f}x",
        ">= 1.5x",
    )
    table.add_row(
        "batch-1 p50 ms int8 torch.ao vs torchao",
        f"{results['torchao_int8_latency']['torch_ao_latency_ms_p50']:.2f}",
        f"{results['torchao_int8_latency']['torchao_latency_ms_p50']:.2f}",
        f"{results['torchao_int8_latency']['ratio']:.2f}x",
        ">= 1.0x",
    )
    Console().print(table)


if __name__ == "__main__":
    main()
