"""Third-party output a stage should not print, filtered once at CLI start-up.

Each entry quotes what it silences, as it appeared in a stage's output; everything else these
libraries print still shows.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

# Their progress bars (loading and writing weights, dataset maps and saves, artifact copies):
# trimflow shows its own progress. A value set in the environment wins (0/true: bars back).
BAR_SWITCHES = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # also transformers'
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
LOGGER_LEVELS = {
    # "Failed to load .../torchao/_C_mxfp8...so" (CUDA kernels) and "Detected no triton", at
    # import; trimflow itself does not use torchao.
    "torchao": logging.ERROR,
    # "<enum 'KernelPreference'> is an Enum subclass ... register_constant() ... is deprecated",
    # from torchao's import too.
    "torch.utils._pytree": logging.ERROR,
    # "Seed set to 42".
    "lightning.fabric.utilities.seed": logging.WARNING,
    # "GPU available: ...", "💡 Tip: ... litlogger ...", "`Trainer.fit` stopped: ..." and the like.
    "lightning.pytorch.utilities.rank_zero": logging.WARNING,
    # "`weights_only` was not set, defaulting to `False`." at each checkpoint a signal saves.
    "lightning.pytorch.trainer.connectors.checkpoint_connector": logging.WARNING,
    # "Creating initial MLflow database tables...", "Updating database tables".
    "mlflow.store.db.utils": logging.WARNING,
    # "Validating input example against model signature" (report registering a model).
    "mlflow.pyfunc": logging.WARNING,
}
# (category, regular expression matching the start of the message)
WARNING_MESSAGES = (
    # Lightning's own pytree helper, on every fit.
    (FutureWarning, re.escape("`isinstance(treespec, LeafSpec)` is deprecated")),
    # On resuming: the work dir holds the checkpoint resumed from.
    (UserWarning, "Checkpoint directory .* exists and is not empty"),
    # On resuming mid-epoch: models.training.ExactResume restores the loader's position.
    (UserWarning, "You're resuming from a checkpoint that ended before the epoch ended"),
    # peft asks every model it wraps, once per adapt stage (transformers 5 renamed the method).
    (FutureWarning, re.escape("`is_gradient_checkpointing` is deprecated")),
    # On a machine with Slurm's client programs: a job that is not a Slurm step is not one.
    (UserWarning, re.escape("The `srun` command is available on your system but is not used")),
)
# onnxruntime's quantization logs through the root logger: "Please consider to run
# pre-processing before quantization", "Quantization parameters for tensor ... not specified",
# "Ignore MatMul due to non constant B".
ORT_QUANTIZATION_CODE = f"{os.sep}onnxruntime{os.sep}quantization{os.sep}"


class _RootHandlersOnly(logging.Logger):
    """A logger that takes no handlers: its records reach the root's handlers only.

    Lightning adds a console handler to the `lightning` logger at import, and its records
    propagate to the root's too, so each Lightning line printed twice (under Hydra as well).
    """

    def addHandler(self, hdlr: logging.Handler) -> None:
        pass


def _not_ort_quantization_chatter(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or ORT_QUANTIZATION_CODE not in record.pathname


def _lightning_logs_once() -> None:
    """Keep the `lightning` logger free of handlers, whether or not Lightning is imported."""
    existing = logging.Logger.manager.loggerDict.get("lightning")
    if isinstance(existing, logging.Logger):
        for handler in list(existing.handlers):
            existing.removeHandler(handler)
        return
    default = logging.getLoggerClass()
    logging.setLoggerClass(_RootHandlersOnly)
    try:
        logging.getLogger("lightning")
    finally:
        logging.setLoggerClass(default)


def quiet_third_party() -> None:
    """Silence the libraries' chatter listed above; call before they are imported."""
    for key, value in BAR_SWITCHES.items():
        os.environ.setdefault(key, value)
    for name, level in LOGGER_LEVELS.items():
        logging.getLogger(name).setLevel(level)
    for category, message in WARNING_MESSAGES:
        warnings.filterwarnings("ignore", message, category)
    logging.getLogger().addFilter(_not_ort_quantization_chatter)
    _lightning_logs_once()
