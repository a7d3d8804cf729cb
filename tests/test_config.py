"""Config composition, validation and its agreement with params.yaml and dvc.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from trimflow.config.loading import ConfigError, compose_config, compose_raw, load_params
from trimflow.layout import STAGE_PARAMS, stage_keys

ROOT = Path(__file__).resolve().parents[1]


def test_committed_params_equal_composition_of_conf():
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert committed == OmegaConf.to_container(compose_raw(), resolve=True)


def test_dvc_yaml_params_match_what_each_stage_reads():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert {name: tuple(stage["params"]) for name, stage in stages.items()} == STAGE_PARAMS


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("+finetune.lrr=1", "finetune.lrr"),
        ("prune.sparsity=1.5", "prune.sparsity"),
        ("finetune.batch_size=zero", "finetune.batch_size"),
        ("finetune.lrr=1", "finetune.lrr"),
        ("quantize.sources=[onnx]", "quantize.sources"),
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


def test_changing_prune_changes_only_prune_and_downstream_keys():
    before = stage_keys(compose_config())
    after = stage_keys(compose_config(["prune.sparsity=0.3"]))
    changed = [stage for stage in STAGE_PARAMS if before[stage] != after[stage]]
    assert changed == ["prune", "quantize", "evaluate", "report"]


def test_smoke_preset_overrides_defaults():
    cfg = compose_config(["experiment=smoke"])
    assert cfg.dataset.max_train_samples == 240
    assert cfg.finetune.max_epochs == 1


def test_cli_rejects_bad_override_without_writing(tmp_path, caplog):
    from trimflow.cli import main

    out = tmp_path / "params.yaml"
    assert main(["params", "prune.sparsity=1.5", "--out", str(out)]) == 2
    assert "prune.sparsity" in caplog.text
    assert not out.exists()


def test_gpu_evaluation_is_refused_until_it_exists():
    with pytest.raises(ConfigError, match=r"evaluate\.device"):
        compose_config(["evaluate.device=cuda"])
