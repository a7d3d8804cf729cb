"""Config composition, validation and its agreement with params.yaml and dvc.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
import yaml
from omegaconf import OmegaConf

from trimflow.config.loading import ConfigError, compose_config, compose_raw, load_params
from trimflow.config.schema import QuantizeVariant
from trimflow.config.schemes import QUANTIZE_SCHEMES
from trimflow.layout import STAGE_PARAMS, VARIANT, VARIANT_STAGES, stage_keys

ROOT = Path(__file__).resolve().parents[1]


def test_committed_params_equal_composition_of_conf():
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert committed == OmegaConf.to_container(compose_raw(), resolve=True)


def test_dvc_yaml_params_match_what_each_stage_reads():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = {
        name: tuple(p.replace("${key}", VARIANT) for p in stage.get("do", stage)["params"])
        for name, stage in stages.items()
    }
    assert declared == STAGE_PARAMS
    assert {name for name, stage in stages.items() if "foreach" in stage} == set(VARIANT_STAGES)


def test_variant_stages_iterate_over_the_declared_variants():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert stages["prune"]["foreach"] == "${prune.variants}"
    assert stages["distill"]["foreach"] == "${distill.students}"
    assert stages["quantize"]["foreach"] == "${quantize.variants}"
    assert stages["quantize"]["do"]["deps"][-1] == "models/${item.source}"


def test_default_is_lean_and_zoo_adds_every_other_scheme():
    default, zoo = compose_config([]), compose_config(["experiment=zoo"])
    assert {name: v.source for name, v in default.prune.variants.items()} == {
        "pruned": "finetuned",
        "distilled_pruned": "distilled",  # compound: the student, pruned
    }
    assert list(default.distill.students) == ["distilled"]
    assert default.adapt.variants == {}  # a 3-epoch adapter costs two fine-tunes: zoo
    assert not default.evaluate.merge_check
    # One int8 form of each trained variant: what the recommendation weighs.
    assert {v.source for v in default.quantize.variants.values()} == {
        "finetuned",
        "pruned",
        "distilled",
        "distilled_pruned",
    }
    assert set(zoo.prune.variants) == {"pruned", "distilled_pruned", "sparse80"}
    assert set(zoo.distill.students) == {"distilled", "distilled_third"}
    assert set(zoo.adapt.variants) == {"lora", "bitfit", "adalora", "ia3", "prefix", "bottleneck"}
    assert set(zoo.quantize.variants) > set(default.quantize.variants)
    assert {v.scheme for v in zoo.quantize.variants.values()} == set(QUANTIZE_SCHEMES) - {"fp16"}


def test_a_pruned_variant_prunes_the_fine_tuned_model_or_a_student():
    with pytest.raises(ConfigError, match=r"prune.variants.pruned.source: 'lora' is neither"):
        compose_config(["experiment=zoo", "prune.variants.pruned.source=lora"])
    cfg = compose_config(["experiment=zoo", "prune.variants.sparse80.source=distilled_third"])
    order = list(cfg.variant_kinds())
    assert order.index("distilled_third") < order.index("sparse80")  # built after its source
    units = stage_keys(cfg)
    other = stage_keys(
        compose_config(["experiment=zoo", "distill.students.distilled_third.layer_fraction=0.2"])
    )
    assert units["prune@sparse80"] != other["prune@sparse80"]  # keyed on its source's config
    assert units["prune@pruned"] == other["prune@pruned"]


def test_the_schema_offers_exactly_the_quantization_schemes_of_the_table():
    assert get_args(QuantizeVariant.model_fields["scheme"].annotation) == tuple(QUANTIZE_SCHEMES)


def test_smoke_declares_every_variant_kind_and_names_are_unique():
    cfg = compose_config(["experiment=smoke"])
    kinds = cfg.variant_kinds()
    assert set(kinds.values()) == {"finetune", "adapt", "prune", "distill", "quantize"}
    schemes = {v.scheme for v in cfg.quantize.variants.values()}
    assert schemes == set(QUANTIZE_SCHEMES)
    methods = {v.method for v in cfg.prune.variants.values()}
    assert methods == {"structured", "magnitude"}
    adapted = {v.method for v in cfg.adapt.variants.values()}
    assert adapted == {"lora", "adalora", "ia3", "prefix", "bitfit", "bottleneck"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+quantize.variants.q2={source: nowhere, scheme: dynamic_int8}"], "q2.source"),
        (["+quantize.variants.pruned={source: finetuned, scheme: bf16}"], "already used"),
        (["+quantize.variants.Bad-Name={source: finetuned, scheme: bf16}"], "Bad-Name"),
        (["+prune.variants.p2={method: wavelet}"], "prune.variants.p2"),
        (["+distill.students.s2={layers: [0], model: x}"], "exactly one"),
        (["report.baseline=nope"], "report.baseline"),
        (["adapt.variants.lora.r=0"], "adapt.variants.lora.r"),
        (["+adapt.variants.a2={method: houlsby}"], "adapt.variants.a2"),
        (["adapt.variants.lora.dropout=1.5"], "adapt.variants.lora.dropout"),
        (
            [
                "+adapt.variants.p={method: prefix, num_virtual_tokens: 4}",
                "+quantize.variants.pq={source: p, scheme: dynamic_int8}",
            ],
            "'p' is prefix-tuned",
        ),
        (["+adapt.variants.finetuned={method: bitfit}"], "already used"),
    ],
)
def test_bad_variant_declarations_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(overrides)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("+finetune.lrr=1", "finetune.lrr"),
        (
            "prune.variants.pruned.heads_fraction=1.5",
            "prune.variants.pruned.heads_fraction",
        ),
        ("finetune.batch_size=zero", "finetune.batch_size"),
        ("finetune.lrr=1", "finetune.lrr"),
        ("quantize.variants.onnx_int8.scheme=onnx_int4", "quantize.variants.onnx_int8.scheme"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_config([override])


def test_missing_required_values_are_named():
    with pytest.raises(ConfigError, match="dataset.train"):
        compose_config(["dataset=files"])


def test_load_params_names_the_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({"seed": -1}))
    with pytest.raises(ConfigError, match=r"params\.yaml(.|\n)*seed"):
        load_params(bad)


def test_changing_one_prune_variant_changes_only_it_and_its_downstream_keys():
    before = stage_keys(compose_config(["experiment=zoo"]))
    after = stage_keys(compose_config(["experiment=zoo", "prune.variants.pruned.ffn_fraction=0.3"]))
    changed = [unit for unit in before if before[unit] != after[unit]]
    assert changed == [
        "prune@pruned",
        "quantize@pruned_onnx_int8",
        "quantize@pruned_quantized",
        "evaluate",
        "report",
    ]


def test_smoke_preset_overrides_defaults():
    cfg = compose_config(["experiment=smoke"])
    assert cfg.dataset.max_train_samples == 240
    assert cfg.finetune.max_epochs == 1


def test_cli_rejects_bad_override_without_writing(tmp_path, caplog):
    from trimflow.cli import main

    out = tmp_path / "params.yaml"
    assert main(["params", "finetune.lr=1.5", "--out", str(out)]) == 2
    assert "finetune.lr" in caplog.text
    assert not out.exists()


@pytest.mark.parametrize(
    ("overrides", "spans"),
    [
        ([], False),
        (["trainer.devices=1"], False),
        (["trainer.devices=2", "trainer.strategy=ddp"], True),
        (["trainer.num_nodes=2"], True),
    ],
)
def test_trainer_config_knows_when_training_spans_processes(overrides, spans):
    assert compose_config(overrides).trainer.data_parallel() is spans


def test_in_process_pipeline_refuses_data_parallel_training(capsys):
    from trimflow.cli import main

    with pytest.raises(SystemExit) as refused:  # Hydra reports the error and exits
        main(["pipeline", "trainer.devices=2", "trainer.strategy=ddp"])
    assert refused.value.code != 0
    message = capsys.readouterr().err
    assert "trainer.devices/trainer.num_nodes" in message and "dvc repro" in message


def test_gpu_evaluation_is_refused_until_it_exists():
    with pytest.raises(ConfigError, match=r"evaluate\.device"):
        compose_config(["evaluate.device=cuda"])


def test_ner_task_selects_its_dataset_and_monitor():
    cfg = compose_config(["task=ner"])
    assert (cfg.task.type, cfg.task.metric) == ("ner", "f1")
    assert cfg.dataset.name == "wnut16" and cfg.dataset.format == "conll"
    assert cfg.dataset.test is None
    assert cfg.finetune.monitor == "val/f1"
    smoke = compose_config(["task=ner", "experiment=smoke"])
    assert smoke.dataset.max_train_samples == 240 and smoke.task.type == "ner"


def test_guard_metrics_default_to_the_task_quality_figures():
    assert compose_config().guard_metrics() == ["accuracy", "macro_f1"]
    assert compose_config(["task=ner"]).guard_metrics() == ["f1", "macro_f1"]
    assert compose_config(["report.guard_metrics=[accuracy]"]).guard_metrics() == ["accuracy"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["report.guard_metrics=[accuracy,f1]"], r"report\.guard_metrics: f1 not measured"),
        (["task=ner", "report.guard_metrics=[accuracy]"], r"report\.guard_metrics: accuracy"),
        (["report.guard_metrics=[]"], r"report\.guard_metrics"),
        (["report.guard_metrics=[nll]"], r"report\.guard_metrics: nll not measured.*ece"),
        (
            ["report.guard_metrics=[accuracy_typo1]", "evaluate.robustness.perturbations=[case]"],
            r"accuracy_typo1 not measured .*accuracy_case",
        ),
        (
            ["task=ner", "report.guard_metrics=[f1,accuracy_typo1]"],
            r"accuracy_typo1 not measured .*f1_typo1",  # NER's robustness score is entity F1
        ),
        (
            ["task=ner", "report.guard_metrics=[f1,attribution_topk_overlap]"],
            r"attribution_topk_overlap not measured",  # explanations: classification only
        ),
    ],
)
def test_unknown_guard_metrics_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(overrides)


def test_beyond_accuracy_figures_can_be_guarded():
    cfg = compose_config(["report.guard_metrics=[accuracy,ece_calibrated,accuracy_typo1]"])
    assert cfg.guard_metrics() == ["accuracy", "ece_calibrated", "accuracy_typo1"]
    ner = compose_config(["task=ner", "report.guard_metrics=[f1,label_loyalty]"])
    assert ner.guard_metrics() == ["f1", "label_loyalty"]


def test_guard_metrics_are_quality_fields_evaluate_writes():
    from trimflow.config.schema import ClassificationTask, NerTask
    from trimflow.evaluation.scoring import EntityScorer, LabelScorer

    assert ClassificationTask.quality_metrics == LabelScorer.quality_keys
    assert NerTask.quality_metrics == EntityScorer.quality_keys


def test_monitor_must_be_logged_by_the_task():
    with pytest.raises(ConfigError, match=r"finetune.monitor: 'val/accuracy' is not logged"):
        compose_config(["task=ner", "finetune.monitor=val/accuracy"])
    with pytest.raises(ConfigError, match="finetune.monitor"):
        compose_config(["finetune.monitor=val/f1"])


def test_unknown_ner_option_is_named():
    with pytest.raises(ConfigError, match="seqeval_mode"):
        compose_config(["task=ner", "task.seqeval_mode=lenient"])


def test_latency_budget_search_needs_a_budget_and_every_stage():
    with pytest.raises(ConfigError, match="search.latency_budget_ms must be set"):
        compose_config(["search.objective=latency_budget"])
    with pytest.raises(ConfigError, match="search.last_stage must be 'report'"):
        compose_config(
            [
                "search.objective=latency_budget",
                "search.latency_budget_ms=5",
                "search.last_stage=finetune",
            ]
        )


def test_server_tracking_preset_points_at_a_server():
    tracking = compose_config(["tracking=server"]).tracking
    assert tracking.enabled and tracking.uri == "http://127.0.0.1:5000"
