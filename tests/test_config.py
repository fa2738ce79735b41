import dataclasses
from pathlib import Path

import pytest

from pipeline.common.config import ConfigError, ExperimentConfig, config_from_dict, flatten, load_config, save_config
from pipeline.common.config_help import KEY_HELP, describe_keys

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "import_reference.yaml"))
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(CONFIGS / name, overrides=["data.stores=[]"])
    assert cfg.train.epochs > 0


def test_defaults_are_the_uniseg_recipe() -> None:
    cfg = config_from_dict({})
    assert (cfg.train.learning_rate, cfg.train.momentum, cfg.train.weight_decay) == (1e-2, 0.99, 3e-5)
    assert (cfg.train.poly_exponent, cfg.train.grad_clip, cfg.train.sampling) == (0.9, 12.0, "balanced")


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "train:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"exp.yaml: train.lr: unknown key"):
        load_config(path)


def test_unknown_section_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trainer: unknown key"):
        load_config(_write(tmp_path, "trainer: {}\n"))


def test_wrong_type_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "train:\n  epochs: '10'\n  batch_size: 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    lines = str(err.value).splitlines()
    assert any("train.epochs: Input should be a valid integer" in line for line in lines)
    assert any("train.batch_size: Input should be greater than 0" in line for line in lines)


def test_missing_store_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, f"data:\n  stores: ['{tmp_path / 'absent.zarr'}']\n")
    with pytest.raises(ConfigError, match="data.stores: store not found: .*absent.zarr"):
        load_config(path)


def test_remote_store_is_not_checked_locally(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "data:\n  stores: ['s3://bucket/task.zarr']\n"))
    assert cfg.data.stores == ("s3://bucket/task.zarr",)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="absent.yaml: config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_overrides_and_round_trip(tmp_path: Path) -> None:
    path = _write(tmp_path, "model:\n  preset: tiny\n")
    cfg = load_config(path, overrides=["train.learning_rate=0.001", "model.patch_size=[16,32,32]"])
    assert cfg.train.learning_rate == 0.001 and cfg.model.patch_size == (16, 32, 32)
    save_config(cfg, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == cfg
    assert flatten(cfg)["model.patch_size"] == [16, 32, 32]


def test_bad_override_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(_write(tmp_path, "{}\n"), overrides=["train.epochs"])


def test_local_stores_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "task.zarr").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict({"data": {"stores": ["task.zarr", "s3://bucket/other.zarr"]}})
    assert cfg.data.stores == (str(tmp_path / "task.zarr"), "s3://bucket/other.zarr")


def test_override_problems_name_the_command_line_and_the_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "train:\n  epochs: '10'\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides=["train.learning_rate=abc", "trainer.x=1"])
    assert str(err.value).splitlines() == [
        f"{path}: train.epochs: Input should be a valid integer",  # the file's own problem still names the file
        "<command line>: train.learning_rate: Input should be a valid number (--set train.learning_rate=abc)",
        "<command line>: trainer: unknown key (--set trainer.x=1)",
    ]


def test_unparsable_override_value_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "{}\n"), overrides=["data.stores=[/x.zarr"])
    assert str(err.value) == ("<command line>: data.stores: cannot read the value '[/x.zarr' as YAML "
                              "(expected ',' or ']', but got '<stream end>')")


def test_overrides_without_a_config_file() -> None:
    cfg = load_config(None, overrides=["train.epochs=3"])
    assert cfg.train.epochs == 3
    with pytest.raises(ConfigError, match=r"^<command line>: train.epochs: .* \(--set train.epochs=x\)$"):
        load_config(None, overrides=["train.epochs=x"])


@pytest.mark.catalogue("set-value")
@pytest.mark.parametrize("stage", ["train", "tune", "finetune"])
def test_bad_override_exits_2_with_one_line(stage: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import importlib

    path = _write(tmp_path, "{}\n")
    extra = ["--pretrained", str(tmp_path), "--store", str(tmp_path)] if stage == "finetune" else []
    main = importlib.import_module(f"pipeline.{stage}.__main__").main
    for override in ("train.learning_rate=abc", "data.stores=[/x.zarr"):
        caplog.clear()
        assert main(["--config", str(path), "--set", override, *extra]) == 2
        (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
        message = record.getMessage()
        assert message.startswith(f"<command line>: {override.split('=')[0]}: ") and str(path) not in message
        assert record.exc_info is None and "\n" not in message


def test_every_config_key_has_one_line_of_help() -> None:
    def keys(prefix: str, section: object) -> set[str]:
        return {k for f in dataclasses.fields(section) for k in (
            keys(f"{prefix}{f.name}.", getattr(section, f.name)) if dataclasses.is_dataclass(getattr(section, f.name))
            else {f"{prefix}{f.name}"})}

    config_keys = keys("", ExperimentConfig())
    assert config_keys - set(KEY_HELP) == set(), "keys without help in pipeline/common/config_help.py"
    assert set(KEY_HELP) - config_keys == set(), "help for keys the config does not have"
    assert all(text and "\n" not in text for text in KEY_HELP.values())
    described = describe_keys(["name", "data", "ingest", "model", "train", "ray", "mlflow", "finetune", "tune"])
    assert all(text in described for text in KEY_HELP.values())
