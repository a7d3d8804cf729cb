"""The report package: Pareto frontier, comparison table, figures and rendered pages."""

from __future__ import annotations

import re

import pandas as pd
import pytest

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
