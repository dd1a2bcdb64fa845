"""Every YAML the training half reads is strict: a repeated or unknown key names file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import ConfigError, load_dataset_spec, load_train_config
from training.tune_fusion import main as tune_fusion_main

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def absolute_dataset() -> str:
    """The README's training config, pointing at its dataset spec by absolute path."""
    text = (CONFIGS / "ecommerce_mmoe.yaml").read_text()
    dataset = CONFIGS / "ecommerce.dataset.yaml"
    return text.replace("dataset: ecommerce.dataset.yaml", f"dataset: {dataset}")


def test_shipped_configs_load() -> None:
    from training.ltr.config import load_ltr_config
    from training.recall.config import load_recall_config

    for path in sorted(CONFIGS.glob("*.yaml")):
        if path.name.endswith(".dataset.yaml"):
            load_dataset_spec(path)
        elif path.name.startswith("recall_"):
            load_recall_config(path)
        elif path.name.startswith("ltr_"):
            load_ltr_config(path)
        elif path.name != "tune_fusion.yaml":
            load_train_config(path)


def test_a_repeated_key_in_a_train_config_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "dup.yaml", absolute_dataset() + "lr: 0.5\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml.*'lr' appears twice"):
        load_train_config(path)


def test_a_repeated_nested_key_in_a_dataset_spec_is_an_error(tmp_path: Path) -> None:
    text = (CONFIGS / "ecommerce.dataset.yaml").read_text()
    path = write(tmp_path, "ds.yaml", text + "name: again\n")
    with pytest.raises(ConfigError, match=r"ds\.yaml.*'name' appears twice"):
        load_dataset_spec(path)


def test_an_unknown_key_names_file_and_key_path(tmp_path: Path) -> None:
    text = absolute_dataset()
    path = write(tmp_path, "typo.yaml", text.replace("  n_experts: 4", "  n_expert: 4"))
    with pytest.raises(ConfigError, match=r"(?s)typo\.yaml.*model\.n_expert: unknown key"):
        load_train_config(path)


def test_tune_fusion_config_is_strict_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (CONFIGS / "tune_fusion.yaml").read_text()
    path = write(tmp_path, "tune.yaml", text + "\nobjective: gmv\n")
    assert tune_fusion_main(["--config", str(path), "--out", str(tmp_path / "f.yaml")]) == 1
    assert "appears twice" in capsys.readouterr().err
