"""ONNX export, ONNX Runtime int8 quantization, and a classifier backed by an ORT session.

Export uses the TorchScript exporter (`dynamo=False`, `dynamic_axes`) with the model switched to
eager attention for the trace. The dynamo exporter also works on BERT, but it takes ~10 s per
export against well under a second, and on a MiniLM-L6-shaped model (batch 1, sequence 64,
2 threads, AVX-512 VNNI) its graph was no faster in fp32 and ~1.5x slower once dynamically
quantized (7.2 ms against 4.9 ms); tracing the SDPA path instead of eager attention leaves
IsNaN/Where mask handling in the graph and cost ~1 ms of the quantized latency.

Every family of `models.families` exports this way, sequence and token classifiers alike, and
agrees with torch to ~1e-6 on other batch sizes and lengths (tests/test_family_io.py): the
trace keeps DeBERTa's relative-position buckets and ModernBERT's rotary angles and
sliding-window mask as shape-generic ops, so a graph traced on short samples is right on
sequences longer than the local window or the position buckets.

The graphs are left as exported: ORT's session optimizer (ORT_ENABLE_ALL) fuses what it can
(`session_fusions`). `onnxruntime.transformers.optimizer.optimize_model` (model type `bert`,
which BERT, RoBERTa, XLM-R, ELECTRA and DistilBERT graphs match) additionally fuses Attention,
SkipLayerNormalization and, for BERT, DistilBERT and ELECTRA, EmbedLayerNormalization, but
measured no faster here, fp32 or dynamically quantized (MiniLM-L6 and BERT-base shapes, batch
1 x 64/128 and 8 x 128, 1-2 threads, AVX2): differences stayed within run-to-run noise, so it
is not run.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from torch import Tensor
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from trimflow.evaluation.inference import model_inputs
from trimflow.evaluation.machine import has_int8_dot_product
from trimflow.models.loading import SEGMENT_INPUT, is_token_classifier, takes_token_type_ids
from trimflow.utils.atomic import atomic_file

OPSET = 17
OUTPUT_NAME = "logits"
WEIGHT_DTYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
QUANT_PARAM_SUFFIXES = ("_scale", "_zero_point")


@contextlib.contextmanager
def _eager_attention(model: PreTrainedModel) -> Iterator[None]:
    """Trace in eval mode with eager attention; restore the attention backend and mode after."""
    previous = model.config._attn_implementation
    was_training = model.training
    model.eval()
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        model.train(was_training)


def _publish(source: Path, target: Path) -> None:
    """Copy `source` over `target` atomically."""
    with atomic_file(target, mode="wb") as handle, open(source, "rb") as data:
        shutil.copyfileobj(data, handle)


def export_onnx(model: PreTrainedModel, sample: dict[str, Tensor], path: str | Path) -> None:
    """Export `model` to one self-contained ONNX file (opset 17) with dynamic batch/sequence axes.

    Graph inputs are the sample's model inputs in `forward`'s argument order, without `labels`,
    nor `token_type_ids` where the model's family takes none (a DistilBERT student distilled
    from a BERT teacher reads the teacher's tokenized data); the output is `logits`
    ([batch, labels], or [batch, sequence, labels] for a token classifier). Whatever layer
    shapes the module has (pruned heads or neurons) are traced as they are.
    """
    inputs = model_inputs(sample)
    if not takes_token_type_ids(model.config):
        inputs.pop(SEGMENT_INPUT, None)
    parameters = inspect.signature(model.forward).parameters
    names = [name for name in parameters if name in inputs]
    if len(names) != len(inputs):
        raise ValueError(f"{sorted(set(inputs) - set(names))} are not arguments of forward")
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    logits_axes = {0: "batch", 1: "sequence"} if is_token_classifier(model) else {0: "batch"}
    buffer = io.BytesIO()
    with _eager_attention(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # legacy exporter notice
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # The padding mask is indexed with non-negative aranges, the case the warning allows.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        # DeBERTa builds its constant attention scale with torch.tensor(size).
        warnings.filterwarnings("ignore", message="To copy construct from a tensor")
        torch.onnx.export(
            model,
            (),
            buffer,
            kwargs={name: inputs[name] for name in names},
            input_names=names,
            output_names=[OUTPUT_NAME],
            dynamic_axes={**axes, OUTPUT_NAME: logits_axes},
            opset_version=OPSET,
            dynamo=False,
        )
    with atomic_file(path, mode="wb") as handle:
        handle.write(buffer.getvalue())


def quantize_onnx_dynamic(fp32_path: str | Path, out_path: str | Path) -> None:
    """Dynamic quantization: int8 MatMul/Gemm weights, uint8 embedding tables, activations
    quantized to uint8 at run time.

    Per-channel weights, on the full int8 range where the CPU has VNNI or AMX and on 7 bits
    (`reduce_range`) where it has not (`has_int8_dot_product`): ONNX Runtime's advice for u8s8
    kernels without VNNI. Measured on the MiniLM-L6 shape (batch 1, sequence 64, 2 threads),
    AVX-512 VNNI: reducing the range was ~7% slower with ~1.8x the logit error; per-channel
    scales ran as fast as per-tensor ones with ~1.5x lower logit error. On an AVX2-only AMD
    EPYC, 7-bit weights cut a perturbed 2-layer BERT's largest logit error from 0.029 to 0.003
    (classification) and from 0.034 to 0.017 (token classification).
    """
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "model.onnx"
        quantize_dynamic(
            fp32_path,
            staged,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=not has_int8_dot_product(),
        )
        _publish(staged, Path(out_path))


class _BatchReader(CalibrationDataReader):
    """Feeds the calibration batches one by one, as numpy arrays of the graph's inputs only."""

    def __init__(self, batches: list[dict[str, Tensor]], input_names: list[str]) -> None:
        self._feeds = ({name: batch[name].numpy() for name in input_names} for batch in batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantize_onnx_static(
    fp32_path: str | Path, out_path: str | Path, calibration_batches: list[dict[str, Tensor]]
) -> None:
    """Static QDQ quantization calibrated on `calibration_batches` (MinMax ranges).

    MatMul weights are int8 per channel, embedding tables uint8, activations uint8. Measured
    on the MiniLM-L6 shape (batch 1, sequence 64, 2 threads): quantizing every supported op
    (Add, Mul, Softmax, LayerNorm, ...) was ~40% slower and less accurate, int8 activations ~6x
    slower (no fast s8s8 kernel), and `quant_pre_process` changed neither speed nor accuracy,
    so it is not run. MinMax is the calibrator that accepts batches of different sequence
    lengths (the histogram-based ones stack all activations and fail).
    """
    if not calibration_batches:
        raise ValueError("static quantization needs at least one calibration batch")
    input_names = [value.name for value in onnx.load(str(fp32_path)).graph.input]
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "model.onnx"
        quantize_static(
            fp32_path,
            staged,
            _BatchReader(calibration_batches, input_names),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gather"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            reduce_range=not has_int8_dot_product(),
            calibrate_method=CalibrationMethod.MinMax,
        )
        _publish(staged, Path(out_path))


# The ONNX rows of config/schemes.py: how each turns the exported fp32 graph into its own, given
# the calibration batches (None: the exported graph is the variant).
ONNX_QUANTIZERS: dict[str, Callable[[Path, Path, list[dict[str, Tensor]]], None] | None] = {
    "onnx_fp32": None,
    "onnx_dynamic_int8": lambda fp32, out, _calibration: quantize_onnx_dynamic(fp32, out),
    "onnx_static_int8": quantize_onnx_static,
}


def session_options(num_threads: int) -> ort.SessionOptions:
    """Options of the sessions that run the graphs: every graph optimization, `num_threads`."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def session_fusions(path: str | Path) -> Counter[str]:
    """The op types ORT's session optimizer puts into the graph at `path` on the CPU (the ops
    of its optimized graph that the graph itself lacks: BiasGelu, FusedMatMul, Attention,
    SkipLayerNormalization...), each with its count."""
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(1)
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3  # not the notice that the saved graph suits this CPU only
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath).graph.node
    exported = {node.op_type for node in onnx.load(str(path)).graph.node}
    return Counter(node.op_type for node in optimized if node.op_type not in exported)


class ExportedClassifier:
    """A sequence or token classifier run from an exported graph, called like the torch model:
    keyword tensors in (the graph's `input_names`; any other keyword, such as `labels`, is
    ignored), a `SequenceClassifierOutput` with the `logits` as a CPU tensor out. Subclasses run
    the graph (`run`) and count its weights (`parameter_counts`)."""

    input_names: list[str]

    def __call__(self, **inputs: Tensor) -> SequenceClassifierOutput:
        """Logits for the graph's declared inputs; any other keyword (`labels`) is ignored."""
        feed = {name: inputs[name].numpy(force=True) for name in self.input_names}
        return SequenceClassifierOutput(logits=torch.from_numpy(self.run(feed)))

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """The graph's logits for `feed`: numpy arrays of its inputs by name."""
        raise NotImplementedError

    def eval(self) -> ExportedClassifier:
        """Itself, as `nn.Module.eval` returns the module: a graph only runs inference."""
        return self

    def parameter_counts(self) -> tuple[int, int]:
        """(total, non-zero) weight elements of the graph."""
        raise NotImplementedError


class OnnxClassifier(ExportedClassifier):
    """An ONNX sequence or token classifier run by ONNX Runtime, called like the torch model;
    on the CPU, or on a GPU through the CUDA execution provider (onnxruntime-gpu)."""

    def __init__(self, path: str | Path, num_threads: int, device: str = "cpu") -> None:
        options = session_options(num_threads)
        self.path = Path(path)
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = [value.name for value in self.session.get_inputs()]

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """The logits of one feed (a session runs concurrent calls safely)."""
        (logits,) = self.session.run([OUTPUT_NAME], feed)
        return logits

    def parameter_counts(self) -> tuple[int, int]:
        """(total, non-zero) weight elements over the graph's initializers.

        Weights are the float, int8 and uint8 initializers of rank >= 1 other than quantization
        scales and zero points (ORT names them `<weight>_scale` / `<weight>_zero_point`): a
        quantized weight counts once, as its `<weight>_quantized` tensor, and an element is
        zero when it equals the zero point (uint8 embeddings are asymmetric; int8 matrices
        symmetric). int64 index constants and scalars are not weights. The exporter stores
        identical tensors once, so a freshly initialised model (all-zero biases, all-one
        LayerNorm weights) counts fewer elements than its torch parameters; trained ones do not
        repeat.
        """
        initializers = {
            tensor.name: tensor for tensor in onnx.load(str(self.path)).graph.initializer
        }
        total = nonzero = 0
        for name, tensor in initializers.items():
            if (
                tensor.data_type not in WEIGHT_DTYPES
                or len(tensor.dims) == 0
                or name.endswith(QUANT_PARAM_SUFFIXES)
            ):
                continue
            zero_point = initializers.get(f"{name.removesuffix('_quantized')}_zero_point")
            zeros = [0] if zero_point is None else np.unique(numpy_helper.to_array(zero_point))
            if len(zeros) > 1:
                raise ValueError(f"{name}: per-channel asymmetric weights are not supported")
            values = numpy_helper.to_array(tensor)
            total += values.size
            nonzero += int(np.count_nonzero(values != zeros[0]))
        return total, nonzero
