"""The report package: Pareto frontier, comparison table, figures and rendered pages."""

from __future__ import annotations

import csv
import re

import pandas as pd
import pytest

from trimflow.report.beyond import beyond_figures, beyond_section, forgotten_section
from trimflow.report.pareto import pareto_front
from trimflow.report.plots import (
    FRONTIER_LABEL,
    confusion_figure,
    save_figure,
    tradeoff_figure,
    training_curves_figure,
)
from trimflow.report.render import render_html, render_markdown
from trimflow.report.tables import (
    Column,
    Table,
    cost_table,
    markdown_table,
    ran_on_gpu,
    runtime_note,
    runtime_table,
    variant_columns,
    variant_rows,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def variant(accuracy, latency, size, throughput, nonzero=100, runtime="torch"):
    """Hand-made evaluate-stage metrics for one variant with 100 parameters."""
    return {
        "runtime": runtime,
        "accuracy": accuracy,
        "macro_f1": accuracy - 0.05,
        "latency_ms_p50": latency,
        "latency_ms_p95": 1.5 * latency,
        "throughput_sps": throughput,
        "size_mb": size,
        "params": 100,
        "nonzero_params": nonzero,
        "agreement": 0.99,
    }


@pytest.fixture
def metrics():
    return {
        "recommended": "quantized",
        "variants": {
            "finetuned": variant(0.90, 20.0, 90.0, 400.0),
            "pruned": variant(0.88, 16.0, 90.0, 500.0, nonzero=50),
            "quantized": variant(0.89, 10.0, 30.0, 800.0, runtime="onnxruntime"),
            "pruned_quantized": variant(0.87, 8.0, 30.0, 1000.0, nonzero=50, runtime="openvino"),
        },
    }


@pytest.fixture
def rows(metrics):
    return variant_rows(metrics)


@pytest.fixture
def history():
    return pd.DataFrame(
        {
            "step": [1, 2, 3, 3, 3, 6, 6],
            "epoch": [0, 0, 0, 0, 0, 1, 1],
            "metric": ["train/loss"] * 3 + ["val/loss", "val/accuracy"] * 2,
            "value": [1.2, 0.9, 0.7, 0.8, 0.7, 0.6, 0.8],
        }
    )


def saved_png(fig, tmp_path, name="figure.png") -> bytes:
    path = tmp_path / name
    save_figure(fig, path)
    return path.read_bytes()


# --- pareto_front ---------------------------------------------------------------------------


def test_pareto_front_excludes_dominated_and_sorts_by_cost():
    points = {"slow": (20.0, 0.90), "worse": (16.0, 0.88), "fast": (10.0, 0.89), "tiny": (8.0, 0.8)}
    assert pareto_front(points) == ["tiny", "fast", "slow"]


def test_pareto_front_keeps_identical_points_and_drops_equal_cost_lower_score():
    points = {"a": (5.0, 0.9), "b": (5.0, 0.9), "c": (5.0, 0.8), "d": (6.0, 0.9)}
    assert pareto_front(points) == ["a", "b"]


def test_pareto_front_single_and_empty():
    assert pareto_front({"only": (1.0, 0.5)}) == ["only"]
    assert pareto_front({}) == []


# --- variant_rows / markdown_table ------------------------------------------------------------


def test_variant_rows_ratios_against_baseline(rows):
    by_name = {row["variant"]: row for row in rows}
    assert [row["variant"] for row in rows] == [
        "finetuned",
        "pruned",
        "quantized",
        "pruned_quantized",
    ]
    base, quantized = by_name["finetuned"], by_name["pruned_quantized"]
    assert (base["speedup"], base["size_ratio"], base["throughput_ratio"]) == (1.0, 1.0, 1.0)
    assert base["delta_pts"] == 0.0
    assert quantized["speedup"] == pytest.approx(20.0 / 8.0)
    assert quantized["size_ratio"] == pytest.approx(3.0)
    assert quantized["throughput_ratio"] == pytest.approx(2.5)
    assert quantized["delta_pts"] == pytest.approx(-3.0)
    assert quantized["sparsity"] == pytest.approx(0.5)
    assert quantized["latency_ms_p50"] == 8.0


def test_variant_rows_marks_each_frontier(rows):
    on_latency = {row["variant"] for row in rows if row["pareto_latency"]}
    on_size = {row["variant"] for row in rows if row["pareto_size"]}
    assert on_latency == {"finetuned", "quantized", "pruned_quantized"}
    assert on_size == {"finetuned", "quantized"}


def test_variant_rows_other_baseline(metrics):
    rows = variant_rows(metrics, baseline="quantized")
    assert rows[0]["speedup"] == pytest.approx(0.5)
    assert rows[0]["delta_pts"] == pytest.approx(1.0)


def test_variant_rows_missing_baseline_names_it(metrics):
    with pytest.raises(KeyError, match="'distilled'"):
        variant_rows(metrics, baseline="distilled")


def test_markdown_table_formats_cells(rows):
    table = markdown_table(rows)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0].startswith("| Variant | Runtime | Accuracy |")
    assert re.fullmatch(r"\|( :?-+:? \|)+", lines[1])
    pruned_quantized = lines[-1]
    for cell in [
        "pruned_quantized",
        "87.00%",
        "-3.00",
        "8.00 ★",
        "2.50x",
        "30.0",
        "3.00x",
        "50.0%",
    ]:
        assert f"| {cell} |" in pruned_quantized
    assert "| +0.00 |" in lines[2]
    assert "| 16.00 |" in lines[3]  # pruned: dominated on latency, no star
    assert "| 90.0 |" in lines[3]  # and on size


def trained(train_s, memory_mb, adapter_mb=None, trainable=100):
    """Training figures as evaluate reads them from a variant's training.json."""
    return {
        "trainable_params": trainable,
        "train_total_params": 100,
        "train_s": train_s,
        "train_samples_per_s": 1000 / train_s,
        "peak_train_mem_mb": memory_mb,
        "train_tokens_per_s": 30_000 / train_s,
        "train_mfu": 0.1,
        "adapter_mb": adapter_mb,
    }


UNTRAINED = dict.fromkeys(trained(1.0, 1.0), None)


@pytest.fixture
def costed(metrics):
    """`metrics` with training figures: pruned's recovery, an adapter, and a quantized copy."""
    figures = {
        "finetuned": trained(120.0, 900.0),
        "pruned": trained(30.0, 850.4),
        "quantized": trained(120.0, 900.0),  # finetuned's, copied by quantize
        "pruned_quantized": UNTRAINED,
        "adapted": trained(60.0, 500.0, adapter_mb=1.25, trainable=5),
    }
    variants = {**metrics["variants"], "adapted": variant(0.895, 20.0, 90.0, 400.0)}
    return {**metrics, "variants": {name: {**variants[name], **figures[name]} for name in figures}}


def test_cost_table_lists_trained_variants_with_figures(costed):
    table = cost_table(costed, ["finetuned", "pruned", "pruned_quantized", "adapted"])
    assert table.heading == "Cost to train"
    assert [row["variant"] for row in table.rows] == ["finetuned", "pruned", "adapted"]
    lines = markdown_table(table.rows, table.columns).splitlines()
    assert lines[0] == (
        "| Variant | Trainable params | Trainable share | Train time (s) | Samples/s"
        " | Peak train memory (MB) | MFU | Saved (MB) |"
    )
    assert lines[2] == "| finetuned | 100 | 100.00% | 120.0 | 8.3 | 900 | 10.0% | 90.0 |"
    assert lines[3].startswith("| pruned | 100 | 100.00% | 30.0 | 33.3 | 850 | 10.0% |")
    assert lines[4] == "| adapted | 5 | 5.00% | 60.0 | 16.7 | 500 | 10.0% | 1.25 (adapter) |"


def test_tradeoff_figure_leaves_out_variants_without_the_cost(costed):
    fig = tradeoff_figure(costed, "peak_train_mem_mb", "peak training memory (MB)")
    labels = {text.get_text() for text in fig.axes[0].texts}
    assert labels == {"finetuned", "pruned", "quantized", "adapted"}


def test_recommendation_text_names_a_training_objective(costed):
    from trimflow.evaluation.recommend import recommend
    from trimflow.report.tables import recommendation_text

    chosen = recommend(costed["variants"], "finetuned", 1.0, ["accuracy"], "train_memory")
    assert recommendation_text(chosen).startswith(
        "Recommended: adapted, the variant needing the least peak training memory within 1.0"
    )


# --- figures ----------------------------------------------------------------------------------


def test_tradeoff_figure_draws_frontier(metrics, tmp_path):
    fig = tradeoff_figure(metrics, "latency_ms_p50", "p50 latency (ms)")
    ax = fig.axes[0]
    (frontier,) = [line for line in ax.get_lines() if line.get_label() == FRONTIER_LABEL]
    assert list(frontier.get_xdata()) == [8.0, 10.0, 20.0]
    assert list(frontier.get_ydata()) == pytest.approx([87.0, 89.0, 90.0])
    assert {text.get_text() for text in ax.texts} == set(metrics["variants"])
    assert saved_png(fig, tmp_path).startswith(PNG_MAGIC)


def test_confusion_figure_annotates_counts(tmp_path):
    fig = confusion_figure(["earn", "acq"], [[8, 2], [0, 0]], "quantized")
    ax = fig.axes[0]
    assert [text.get_text() for text in ax.texts] == ["8", "2", "0", "0"]
    assert ax.images[0].get_array()[0].tolist() == pytest.approx([0.8, 0.2])
    assert ax.images[0].get_array()[1].tolist() == [0.0, 0.0]
    assert saved_png(fig, tmp_path).startswith(PNG_MAGIC)


def test_training_curves_one_line_per_history_and_metric(history, tmp_path):
    fig = training_curves_figure({"finetune": history, "prune recovery": history})
    loss_ax, accuracy_ax = fig.axes
    assert len(loss_ax.get_lines()) == 4
    assert [line.get_label() for line in accuracy_ax.get_lines()] == [
        "finetune val/accuracy",
        "prune recovery val/accuracy",
    ]
    assert list(accuracy_ax.get_lines()[0].get_ydata()) == pytest.approx([70.0, 80.0])
    assert saved_png(fig, tmp_path).startswith(PNG_MAGIC)


def test_training_curves_skips_missing_metrics(history):
    only_loss = history[history["metric"] == "train/loss"]
    fig = training_curves_figure({"finetune": only_loss, "prune recovery": pd.DataFrame()})
    assert [ax.get_title() for ax in fig.axes] == ["Loss"]


def test_training_curves_none_without_data():
    assert training_curves_figure({}) is None
    assert training_curves_figure({"finetune": pd.DataFrame()}) is None


def test_save_figure_replaces_existing_file(metrics, tmp_path):
    path = tmp_path / "plots" / "tradeoff.png"
    path.parent.mkdir()
    path.write_bytes(b"stale")
    save_figure(tradeoff_figure(metrics, "size_mb", "size (MB)"), path)
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert [p.name for p in path.parent.iterdir()] == ["tradeoff.png"]


# --- rendering --------------------------------------------------------------------------------


@pytest.fixture
def images(metrics, tmp_path):
    paths = {}
    for caption, cost_key in [("Accuracy vs latency", "latency_ms_p50"), ("Size", "size_mb")]:
        paths[caption] = tmp_path / f"{cost_key}.png"
        save_figure(tradeoff_figure(metrics, cost_key, cost_key), paths[caption])
    return paths


def test_a_run_on_a_gpu_shows_each_variant_device_and_gpu_memory(metrics):
    assert not ran_on_gpu(metrics)  # a CPU run keeps the table as it was
    on_gpu = {"device": "cuda", "peak_gpu_mem_mb": 310.4}
    on_cpu = {"device": "cpu", "peak_gpu_mem_mb": None}
    metrics["variants"] = {
        name: {**values, **(on_cpu if "quantized" in name else on_gpu)}
        for name, values in metrics["variants"].items()
    }
    assert ran_on_gpu(metrics)
    lines = markdown_table(variant_rows(metrics), variant_columns(gpu=True)).splitlines()
    assert lines[0].startswith(
        "| Variant | Runtime | Accuracy | Δ acc (pts) | Macro-F1 | Device | GPU memory"
    )
    assert "| cuda | 310 |" in lines[2] and "| cpu | – |" in lines[4]


def test_the_runtime_table_shows_each_models_fastest_form_per_runtime(metrics):
    models = {"finetuned": ["finetuned", "quantized"], "pruned": ["pruned", "pruned_quantized"]}
    table = runtime_table(metrics, models)
    lines = markdown_table(table.rows, table.columns).splitlines()
    assert lines[0] == (
        "| Model | torch p50 (ms) | ONNX Runtime p50 (ms) | OpenVINO p50 (ms) | Fastest here |"
    )
    assert lines[2] == "| finetuned | 20.00 (finetuned) | 10.00 (quantized) | – | quantized |"
    assert (
        lines[3] == "| pruned | 16.00 (pruned) | – | 8.00 (pruned_quantized) | pruned_quantized |"
    )
    assert runtime_note(metrics, table).startswith(
        "The recommended variant, quantized, runs on ONNX Runtime: of the runtimes"
    )
    alone = runtime_table(metrics, {"finetuned": ["finetuned"], "pruned": ["pruned"]})
    assert alone.rows == []  # one runtime a model: nothing to compare
    assert (
        runtime_note(metrics, alone) == "The recommended variant, quantized, runs on ONNX Runtime."
    )


def test_render_markdown_links_images_and_lists_notes(rows):
    images = {"Accuracy vs latency": "figures/latency.png", "Size": "figures/size.png"}
    tables = [Table("", variant_columns(), rows)]
    text = render_markdown("Report", "Recommended: quantized", tables, images, ["2 threads"])
    assert text.startswith("# Report\n\n**Recommended: quantized**\n")
    assert markdown_table(rows) in text
    assert "![Accuracy vs latency](figures/latency.png)" in text
    assert "![Size](figures/size.png)" in text
    assert "- 2 threads" in text


def test_render_html_is_self_contained_and_escaped(rows, images):
    page = render_html(
        "A <b> report",
        "Pick <it>",
        [Table("", variant_columns(), rows)],
        images,
        ["<script>alert(1)</script>", "cpu"],
    )
    assert "<p><strong>Pick &lt;it&gt;</strong></p>" in page
    assert "<td>quantized (recommended)</td>" in page
    assert page.count("data:image/png;base64,") == len(images)
    assert 'src="http' not in page
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<title>A &lt;b&gt; report</title>" in page
    assert page.count('<tr class="frontier">') == 3
    assert "<td>pruned_quantized</td>" in page


def test_recommendation_text_names_every_guard_and_each_exclusion():
    from trimflow.evaluation.recommend import recommend
    from trimflow.report.tables import exclusion_lines, recommendation_text

    variants = {
        "finetuned": variant(0.90, 20.0, 90.0, 400.0),
        "quantized": variant(0.895, 10.0, 30.0, 800.0),
        "distilled": {**variant(0.90, 5.0, 30.0, 900.0), "macro_f1": 0.70},
        "tiny": {**variant(0.80, 2.0, 10.0, 990.0), "macro_f1": 0.60},
    }
    chosen = recommend(variants, "finetuned", 1.0, ["accuracy", "macro_f1"])
    assert recommendation_text(chosen) == (
        "Recommended: quantized, the fastest variant within 1.0 points of finetuned on "
        "accuracy and macro-F1: 2.00x faster at batch 1, 3.00x smaller on disk, "
        "accuracy -0.50 points, macro-F1 -0.50 points."
    )
    assert exclusion_lines(chosen) == [
        "distilled: macro-F1 -15.00 points",
        "tiny: accuracy -10.00 points, macro-F1 -25.00 points",
    ]


def test_report_pages_list_the_variants_each_guard_excluded(rows, images):
    tables = [Table("", variant_columns(), rows)]
    excluded = ["distilled: macro-F1 -15.00 points"]
    text = render_markdown("Report", "Recommended: quantized", tables, {}, [], excluded)
    assert "**Recommended: quantized**\n\nExcluded by the quality guards" in text
    assert "\n- distilled: macro-F1 -15.00 points\n" in text
    page = render_html("Report", "Recommended: quantized", tables, images, [], excluded)
    assert "<li>distilled: macro-F1 -15.00 points</li>" in page
    assert "Excluded by" not in render_markdown("Report", "R", tables, {}, [])


# --- NER -----------------------------------------------------------------------------------------


def ner_variant(f1, latency, size, per_type):
    return {
        **variant(0.95, latency, size, 100.0),
        "f1": f1,
        "precision": f1 + 0.05,
        "recall": f1 - 0.05,
        "token_accuracy": 0.95,
        "per_type": {t: {"f1": v, "precision": v, "recall": v, "support": 3} for t, v in per_type},
    }


@pytest.fixture
def ner_metrics():
    return {
        "task": "ner",
        "metric": "f1",
        "recommended": "quantized",
        "variants": {
            "finetuned": ner_variant(0.50, 20.0, 90.0, [("loc", 0.6), ("per", 0.4)]),
            "quantized": ner_variant(0.495, 8.0, 30.0, [("loc", 0.6)]),
        },
        "baselines": {
            "gazetteer": {"f1": 0.2, "precision": 0.6, "recall": 0.12, "token_accuracy": 0.9}
        },
    }


def test_ner_rows_rank_on_entity_f1(ner_metrics):
    rows = variant_rows(ner_metrics)
    assert rows[1]["delta_pts"] == pytest.approx(-0.5)
    table = markdown_table(rows, variant_columns("f1")).splitlines()
    assert table[0].startswith(
        "| Variant | Runtime | Entity F1 | Δ F1 (pts) | Precision | Recall |"
    )
    assert "| 0.495 | -0.50 | 0.545 | 0.445 | 95.00% |" in table[3]


def test_ner_per_type_and_baseline_tables(ner_metrics):
    from trimflow.report.tables import baseline_table, per_type_table

    per_type = per_type_table(ner_metrics["variants"])
    assert [c.header for c in per_type.columns] == ["Variant", "loc", "per"]
    lines = markdown_table(per_type.rows, per_type.columns).splitlines()
    assert lines[3] == "| quantized | 0.600 | 0.000 |"  # a type never predicted scores 0
    baselines = baseline_table(ner_metrics, "finetuned")
    lines = markdown_table(baselines.rows, baselines.columns).splitlines()
    assert lines[2].startswith("| gazetteer | 0.200 |") and lines[3].startswith(
        "| finetuned | 0.500 |"
    )


def test_ner_recommendation_uses_the_f1_budget(ner_metrics):
    from trimflow.evaluation.recommend import recommend
    from trimflow.report.tables import recommendation_text

    chosen = recommend(ner_metrics["variants"], "finetuned", 1.0, ["f1"])
    assert chosen["variant"] == "quantized"
    assert chosen["drop_pts"] == {"f1": pytest.approx(0.5)}
    assert "within 1.0 points of finetuned on entity F1:" in recommendation_text(chosen)
    assert recommend(ner_metrics["variants"], "finetuned", 0.4, ["f1"])["variant"] == ("finetuned")


def test_ner_tradeoff_plots_entity_f1(ner_metrics, tmp_path):
    fig = tradeoff_figure(ner_metrics, "latency_ms_p50", "p50 latency (ms)")
    assert fig.axes[0].get_ylabel() == "entity F1 (%)"
    assert saved_png(fig, tmp_path).startswith(PNG_MAGIC)


# --- beyond accuracy -----------------------------------------------------------------------------


def beyond(accuracy, loyalty, forgotten):
    """Hand-made beyond-accuracy figures of one classification variant, every part turned on."""
    return {
        "label_loyalty": loyalty,
        "probability_loyalty": 0.99,
        "flip_rate": 1 - loyalty,
        "flip_accuracy": None if loyalty == 1 else 0.25,
        "forgotten": forgotten,
        "ece": 0.12,
        "nll": 0.4,
        "brier": 0.2,
        "temperature": 1.5,
        "ece_calibrated": 0.05,
        "nll_calibrated": 0.35,
        "brier_calibrated": 0.18,
        "sample_accuracy": accuracy + 0.01,
        "accuracy_typo1": accuracy - 0.02,
        "invariance_failure_typo1": 0.03,
        "accuracy_case": accuracy,
        "invariance_failure_case": 0.0,
        "worst_slice": "length=>=256",
        "worst_slice_accuracy": accuracy - 0.2,
        "slice_gap": 0.25,
        "slice_gap_change": 0.25 - 0.2,
        "attribution_topk_overlap": loyalty,
        "attribution_rank_correlation": 0.5,
        "explain_ms": 12.34,
    }


@pytest.fixture
def beyond_metrics(metrics):
    """`metrics` with the beyond-accuracy figures evaluate writes against finetuned."""
    loyalty = {"finetuned": (1.0, 0), "pruned": (0.95, 5), "quantized": (0.97, 12)}
    loyalty["pruned_quantized"] = (0.9, 8)
    return {
        **metrics,
        "variants": {
            name: {**values, **beyond(values["accuracy"], *loyalty[name])}
            for name, values in metrics["variants"].items()
        },
    }


def reliability(filled):
    """Five confidence bins over [0, 1]; `filled`: bin index -> (confidence, accuracy, count)."""
    return [
        {
            "low": index / 5,
            "high": (index + 1) / 5,
            "count": filled.get(index, (None, None, 0))[2],
            "confidence": filled.get(index, (None, None, 0))[0],
            "accuracy": filled.get(index, (None, None, 0))[1],
        }
        for index in range(5)
    ]


def slice_report(class_accuracy, length_accuracy):
    """A slice report as evaluate writes it, with the class and length slicings."""

    def slicing(scores):
        slices = {value: {"accuracy": score, "count": 4} for value, score in scores.items()}
        return {"slices": slices, "gap": max(scores.values()) - min(scores.values())}

    return {
        "metric": "accuracy",
        "min_size": 2,
        "slicings": {"class": slicing(class_accuracy), "length": slicing(length_accuracy)},
        "worst_slice": "length=>=256",
        "worst_slice_accuracy": min(length_accuracy.values()),
        "slice_gap": 0.25,
        "slice_gap_column": "length",
    }


def classification_detail(shift, forgotten_examples=(), score_change=None):
    """The beyond-accuracy part of a variant's detail file; `shift` moves its scores."""
    lengths = {"128-255": 0.8 - shift, "<64": 0.95 - shift, ">=256": 0.7 - shift}
    return {
        "reliability": reliability({3: (0.7, 0.6 - shift, 10), 4: (0.9, 0.85 - shift, 30)}),
        "reliability_calibrated": reliability({3: (0.65, 0.6, 12), 4: (0.88, 0.86, 28)}),
        "slices": slice_report({"earn": 0.9 - shift, "acq": 0.8}, {**lengths, "64-127": 0.85}),
        "flips": {
            "flips": len(forgotten_examples) + 2,
            "flip_rate": 0.03,
            "flip_accuracy": 0.25,
            "baseline_flip_accuracy": 0.75,
            "forgotten": len(forgotten_examples),
            "learned": 2,
            "forgotten_examples": list(forgotten_examples),
        },
        "score_change": score_change or {"earn": 0.0, "acq": 0.0},
    }


FORGOTTEN = [
    {"row": row, "text": f"text\n{row}", "truth": "earn", "baseline": "earn", "variant": "acq"}
    for row in range(12)
]


@pytest.fixture
def details():
    """Detail files of the baseline and the recommended variant."""
    return {
        "finetuned": classification_detail(0.0),
        "quantized": classification_detail(
            0.05, FORGOTTEN, {"earn": -0.05, "acq": 0.02, "crude": -0.005}
        ),
    }


def section_lines(table):
    return markdown_table(table.rows, table.columns).splitlines()


def test_beyond_accuracy_has_a_table_per_theme_each_with_its_source(beyond_metrics):
    section = beyond_section(beyond_metrics, "finetuned", {})
    assert section.heading == "Beyond accuracy"
    loyalty, calibration, robustness, slices, explanations = section.tables
    sources = ["Xu et al. 2021", "Guo et al. 2017", "CheckList", "MetricFrame", "Krishna et al."]
    for table, source in zip(section.tables, sources, strict=True):
        assert source in table.note
    assert loyalty.heading == "Loyalty to finetuned"
    lines = section_lines(loyalty)
    assert lines[0] == (
        "| Variant | Label loyalty | Probability loyalty | Flipped | Accuracy on flips"
        " | Forgotten |"
    )
    assert lines[2] == "| finetuned | 100.00% | 0.990 | 0.00% | – | 0 |"
    assert lines[4] == "| quantized (recommended) | 97.00% | 0.990 | 3.00% | 25.00% | 12 |"
    assert section_lines(calibration)[4] == (
        "| quantized (recommended) | 0.120 → 0.050 | 0.400 → 0.350 | 0.200 → 0.180 | 1.50 |"
    )
    lines = section_lines(robustness)
    assert lines[0] == "| Variant | Clean | typo1 (Δ pts) | case (Δ pts) | typo1 INV | case INV |"
    assert (
        lines[4]
        == "| quantized (recommended) | 90.00% | 87.00% (-3.00) | 89.00% (-1.00) | 3.00% | 0.00% |"
    )
    assert section_lines(slices)[4] == (
        "| quantized (recommended) | length=>=256 | 69.00% | 25.00 | +5.00 |"
    )
    assert section_lines(explanations)[3] == "| pruned | 0.950 | +0.500 | 12.3 |"


def test_beyond_accuracy_shows_only_the_figures_evaluate_wrote(beyond_metrics):
    dropped = {"temperature", "ece_calibrated", "nll_calibrated", "brier_calibrated"}
    dropped |= {"attribution_topk_overlap", "attribution_rank_correlation", "explain_ms"}
    dropped |= {"accuracy_case", "invariance_failure_case"}
    for values in beyond_metrics["variants"].values():
        for key in dropped:
            del values[key]
    section = beyond_section(beyond_metrics, "finetuned", {})
    headings = [table.heading for table in section.tables]
    assert headings == ["Loyalty to finetuned", "Calibration", "Robustness", "Slices"]
    calibration, robustness = section.tables[1:3]
    lines = section_lines(calibration)
    assert lines[0] == "| Variant | ECE | NLL | Brier |"
    assert lines[2] == "| finetuned | 0.120 | 0.400 | 0.200 |"
    assert [c.header for c in robustness.columns] == [
        "Variant",
        "Clean",
        "typo1 (Δ pts)",
        "typo1 INV",
    ]


def test_ner_reports_show_only_loyalty_and_no_figures(ner_metrics, metrics):
    loyalty = {"label_loyalty": 0.98, "flip_rate": 0.1, "forgotten": 2}
    for values in ner_metrics["variants"].values():
        values.update(loyalty)
    section = beyond_section(ner_metrics, "finetuned", {})
    (table,) = section.tables
    assert [c.header for c in table.columns] == ["Variant", "Label loyalty", "Flipped", "Forgotten"]
    assert section_lines(table)[3] == "| quantized (recommended) | 98.00% | 10.00% | 2 |"
    ner_details = {name: {"per_type": v["per_type"]} for name, v in ner_metrics["variants"].items()}
    assert beyond_figures(ner_metrics, ner_details, "finetuned") == {}
    assert beyond_section(metrics, "finetuned", {}) is None  # evaluate wrote none of it


def test_tradeoff_csv_gains_the_beyond_accuracy_figures(beyond_metrics, metrics, tmp_path):
    from trimflow.stages.report import _write_tradeoff_csv

    path = tmp_path / "tradeoff.csv"
    _write_tradeoff_csv(variant_rows(beyond_metrics), "accuracy", path)
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:7] == [
        "variant",
        "quality",
        "latency_ms_p50",
        "size_mb",
        "throughput_sps",
        "label_loyalty",
        "probability_loyalty",
    ]
    assert list(rows[0])[-3:] == [
        "attribution_topk_overlap",
        "attribution_rank_correlation",
        "explain_ms",
    ]
    assert {"ece_calibrated", "temperature", "accuracy_case", "invariance_failure_typo1"} < set(
        rows[0]
    )
    assert rows[0]["flip_accuracy"] == "" and rows[2]["forgotten"] == "12"
    assert rows[2]["worst_slice"] == "length=>=256"
    _write_tradeoff_csv(variant_rows(metrics), "accuracy", path)
    assert (
        path.read_text().splitlines()[0] == "variant,quality,latency_ms_p50,size_mb,throughput_sps"
    )


def test_beyond_figures_are_drawn_and_written(beyond_metrics, details, tmp_path):
    figures = beyond_figures(beyond_metrics, details, "finetuned")
    assert {caption: name for caption, (name, _) in figures.items()} == {
        "Reliability diagram": "reliability.png",
        "Accuracy under perturbations": "robustness.png",
        "Accuracy per slice": "slices.png",
    }
    before, after = figures["Reliability diagram"][1].axes
    assert [ax.get_title() for ax in (before, after)] == [
        "uncalibrated",
        "temperature-scaled",
    ]
    diagonal, finetuned, quantized = before.get_lines()
    assert list(diagonal.get_xdata()) == [0, 100] == list(diagonal.get_ydata())
    assert quantized.get_label() == "quantized"
    assert list(quantized.get_xdata()) == pytest.approx([70.0, 90.0])  # the empty bins left out
    assert list(quantized.get_ydata()) == pytest.approx([55.0, 80.0])
    (robustness,) = figures["Accuracy under perturbations"][1].axes
    assert [label.get_text() for label in robustness.get_yticklabels()] == list(
        beyond_metrics["variants"]
    )
    _ranges, clean, typo1, case = robustness.collections
    assert [clean.get_label(), typo1.get_label(), case.get_label()] == ["clean", "typo1", "case"]
    assert typo1.get_offsets()[:, 0].tolist() == pytest.approx([88.0, 86.0, 87.0, 85.0])
    by_class, by_length = figures["Accuracy per slice"][1].axes
    assert [label.get_text() for label in by_length.get_yticklabels()] == [
        "<64 (n=4)",
        "64-127 (n=4)",
        "128-255 (n=4)",
        ">=256 (n=4)",
    ]
    widths = [bar.get_width() for bar in by_class.patches]
    assert widths == pytest.approx([90.0, 80.0, 85.0, 80.0])  # finetuned's bars, quantized's
    for name, figure in figures.values():
        assert saved_png(figure, tmp_path, name).startswith(PNG_MAGIC)


def test_without_temperature_scaling_the_reliability_diagram_has_one_panel(beyond_metrics, details):
    for detail in details.values():
        del detail["reliability_calibrated"]
    _, figure = beyond_figures(beyond_metrics, details, "finetuned")["Reliability diagram"]
    assert [ax.get_title() for ax in figure.axes] == ["uncalibrated"]


def test_the_forgotten_section_lists_ten_examples_and_the_recall_losses(beyond_metrics, details):
    section = forgotten_section(beyond_metrics, details, "finetuned")
    assert section.heading == "What the recommended variant forgot"
    assert section.intro.startswith(
        "quantized misses 12 test examples finetuned got right and gets 2 right that finetuned"
    )
    examples, losses = section.tables
    assert examples.heading == "Forgotten examples (the first 10 of 12)"
    lines = section_lines(examples)
    assert lines[0] == "| Row | Text | Truth | finetuned | quantized |"
    assert lines[2] == "| 0 | text 0 | earn | earn | acq |"  # the text's line break a space
    assert len(lines) == 2 + 10
    assert losses.heading == "Classes whose recall fell by more than 1 point"
    assert section_lines(losses)[2:] == ["| earn | -5.00 |"]  # crude lost only 0.5 points


def test_the_forgotten_section_says_when_no_class_lost_recall(beyond_metrics, details):
    details["quantized"] = classification_detail(0.05)
    section = forgotten_section(beyond_metrics, details, "finetuned")
    assert section.tables == []
    assert section.intro.endswith("No class lost more than 1 point of recall.")
    beyond_metrics["recommended"] = "finetuned"
    assert forgotten_section(beyond_metrics, details, "finetuned") is None


def test_the_forgotten_section_of_a_ner_variant_lists_entities(ner_metrics):
    entity = {"row": 4, "text": "New York", "truth": "LOC", "variant": "B-ORG I-ORG"}
    flips = {"entity_flips": 3, "flip_rate": 0.1, "forgotten": 1, "learned": 0}
    details = {
        "finetuned": {},
        "quantized": {
            "flips": {**flips, "forgotten_examples": [entity]},
            "score_change": {"LOC": -0.2, "PER": 0.0},
        },
    }
    section = forgotten_section(ner_metrics, details, "finetuned")
    assert section.intro.startswith("quantized misses 1 test entities finetuned got right")
    examples, losses = section.tables
    assert section_lines(examples)[0] == "| Sentence | Entity | Type | quantized's tags |"
    assert section_lines(examples)[2] == "| 4 | New York | LOC | B-ORG I-ORG |"
    assert losses.heading == "Entity types whose F1 fell by more than 1 point"
    assert section_lines(losses)[2] == "| LOC | -20.00 |"


def test_report_pages_put_the_sections_after_the_variant_table(
    rows, beyond_metrics, details, images
):
    later = Table("Later", (Column("Variant", lambda row: row["variant"], numeric=False),), rows)
    tables = [Table("", variant_columns(), rows), later]
    sections = [
        beyond_section(beyond_metrics, "finetuned", images),
        forgotten_section(beyond_metrics, details, "finetuned"),
    ]
    text = render_markdown("Report", "R", tables, {}, [], sections=sections)
    order = [
        markdown_table(rows),
        "## Beyond accuracy",
        "### Loyalty to finetuned\n\nWhether each variant still answers as finetuned does",
        "### Explanations",
        "### Accuracy vs latency\n\n![Accuracy vs latency]",
        "## What the recommended variant forgot\n\nquantized misses 12",
        "### Forgotten examples",
        "## Later",
    ]
    positions = [text.index(part) for part in order]
    assert positions == sorted(positions)
    page = render_html("Report", "R", tables, {}, [], sections=sections)
    assert "<h3>Calibration</h3>\n<p>Whether confidence reads as a probability" in page
    assert page.count("data:image/png;base64,") == len(images)
    assert page.index("<h2>Beyond accuracy</h2>") < page.index("<h2>Later</h2>")
    assert "<td>quantized (recommended)</td>" in page
