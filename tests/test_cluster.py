"""The cluster recipes in cluster/: Ray's own validators, security defaults, and the scripts.

No cloud calls: the cluster YAMLs go through the launcher's offline steps (`prepare_config`:
defaults, merged setup commands, docker checks, node-type limits) and its schema validator
(`validate_config`), the steps `ray up` runs before it talks to a provider. Job and MLflow
scripts run against fake `ray` / `mlflow` executables that record their arguments.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.local.config import bootstrap_local
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CLUSTER_YAMLS = ("aws-gpu.yaml", "onprem.yaml")
STAGES = {"ingest", "train", "evaluate", "predict", "tune"}
BASH = shutil.which("bash")


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _ray_up_offline(config: dict) -> dict:
    """What `ray up` does to a config before any provider call, then Ray's validator."""
    prepared = prepare_config(copy.deepcopy(config))
    if prepared["provider"]["type"] == "local":
        prepared = bootstrap_local(prepared)
    validate_config(prepared)
    return prepared


def _start_commands(config: dict) -> list[str]:
    return config["head_start_ray_commands"] + config["worker_start_ray_commands"]


def _option(command: str, name: str) -> str | None:
    """Value of `--name=value` or `--name value` in a shell command."""
    words = shlex.split(command.replace(";", " ; "))
    for i, word in enumerate(words):
        if word.startswith(f"{name}="):
            return word.split("=", 1)[1]
        if word == name and i + 1 < len(words):
            return words[i + 1]
    return None


# --- cluster YAMLs -------------------------------------------------------------------------


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_cluster_yaml_passes_ray_validator(name: str) -> None:
    prepared = _ray_up_offline(_load(name))
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_every_cluster_yaml_is_tested() -> None:
    assert sorted(p.name for p in CLUSTER.glob("*.yaml") if p.name != "runtime_env.yaml") == sorted(CLUSTER_YAMLS)


def test_aws_cluster_has_cpu_head_and_autoscaling_gpu_workers() -> None:
    prepared = _ray_up_offline(_load("aws-gpu.yaml"))
    types = prepared["available_node_types"]
    assert "GPU" not in types[prepared["head_node_type"]]["resources"]
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(t["min_workers"] == 0 < t["max_workers"] for t in gpu_types)
    # Workers reach S3 through an instance profile, not keys.
    assert all("IamInstanceProfile" in t["node_config"] for t in gpu_types)
    assert "AWS_SECRET_ACCESS_KEY" not in (CLUSTER / "aws-gpu.yaml").read_text()


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda c: c.update(max_worker=4), jsonschema.ValidationError),  # typo at the top level
        (lambda c: c["available_node_types"]["gpu.a10g"].update(min_worker=1), jsonschema.ValidationError),
        (lambda c: c["available_node_types"]["gpu.a10g"]["resources"].update(GPU="one"), jsonschema.ValidationError),
        (lambda c: c["auth"].update(ssh_key="~/.ssh/id"), jsonschema.ValidationError),
        (lambda c: c["docker"].update(imag="rayproject/ray"), jsonschema.ValidationError),
        (lambda c: c.update(head_node_type="head.gpu"), ValueError),
    ],
    ids=["top-level", "node-type", "resource-type", "auth", "docker", "head-node-type"],
)
def test_ray_validator_rejects_broken_aws_yaml(mutate, error) -> None:
    config = _load("aws-gpu.yaml")
    mutate(config)
    with pytest.raises(error):
        _ray_up_offline(config)


def test_ray_validator_rejects_broken_onprem_yaml() -> None:
    config = _load("onprem.yaml")
    config["setup_command"] = ["echo typo"]
    with pytest.raises(jsonschema.ValidationError, match="setup_command"):
        _ray_up_offline(config)


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_token_auth_on_every_node(name: str) -> None:
    config = _load(name)
    starts = [c for c in _start_commands(config) if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        before_start = command.split("ray start")[0]
        assert "RAY_AUTH_MODE=token" in before_start, command
    # The token generated on the user's machine is copied to every node.
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    # Interactive shells on the nodes (ray attach / exec) use token auth too.
    assert any("export RAY_AUTH_MODE=token" in c for c in config["setup_commands"])


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_dashboard_binds_localhost(name: str) -> None:
    config = _load(name)
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start --head" in c]
    assert _option(head_start, "--dashboard-host") == "127.0.0.1"
    assert not any("0.0.0.0" in c for c in _start_commands(config))


@pytest.mark.skipif(BASH is None, reason="needs bash")
@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_nodes_export_the_head_address_runtime_env_uses(name: str) -> None:
    """Head and workers export the same UNISEG_HEAD_IP (the head's address as Ray sees it)
    before `ray start`, so the MLflow URI in runtime_env.yaml is one valid string on every node."""
    import ray.util

    config = _load(name)
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    (worker_start,) = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert "UNISEG_HEAD_IP=$RAY_HEAD_IP" in worker_start.split("ray start")[0]
    # Run the head's prefix here (without the node's venv activation) and read what it exports.
    prefix = head_start.split("ray start")[0].replace("source ~/uniseg-env/bin/activate;", "")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run([BASH, "-c", prefix + ' echo "$RAY_AUTH_MODE $UNISEG_HEAD_IP"'], env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert out == ["token", ray.util.get_node_ip_address()]
    runtime_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert "${UNISEG_HEAD_IP}" in runtime_env["env_vars"]["MLFLOW_TRACKING_URI"]


# --- runtime env ---------------------------------------------------------------------------


def test_runtime_env_is_valid_for_ray() -> None:
    raw = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert set(raw) <= RuntimeEnv.known_fields
    RuntimeEnv(**raw)  # type checks env_vars (str -> str) and excludes (list of str)
    assert not any(k.startswith("AWS_") for k in raw["env_vars"]), "credentials come from the IAM instance profile"


def test_runtime_env_excludes_venv_data_and_outputs(tmp_path: Path) -> None:
    """Package a fake repository with Ray's own packager and the runtime env's excludes."""
    from ray._private.runtime_env.packaging import create_package

    excludes = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["excludes"]
    repo = tmp_path / "repo"
    kept = ["pipeline/train/__init__.py", "configs/tiny-cpu.yaml", "cluster/runtime_env.yaml"]
    dropped = [
        ".venv/bin/python",
        ".git/HEAD",
        "outputs/ray/checkpoint_000001/model.safetensors",
        "stores/Task04_Hippocampus.zarr/zarr.json",
        "mlruns/0/meta.yaml",
        "mlflow.db",
        "mlflow.db-wal",
        "mlflow.db.lock",
        "pipeline/__pycache__/x.pyc",
    ]
    for rel in kept + dropped:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("x")
    package = tmp_path / "pkg.zip"
    create_package(str(repo), package, include_gitignore=False, excludes=excludes)
    names = set(zipfile.ZipFile(package).namelist())
    assert set(kept) <= names
    dropped_dirs = (".venv/", ".git/", "outputs/", "stores/Task04_Hippocampus.zarr/", "mlruns/",
                    "pipeline/__pycache__/")
    assert not [n for n in names if n in dropped or n.startswith(dropped_dirs)]


# --- job scripts ---------------------------------------------------------------------------


def _fake(bin_dir: Path, name: str, record: Path) -> None:
    """An executable that records its working directory and arguments (one per line)."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    script.write_text(f'#!/bin/sh\npwd > "{record}"\nfor a in "$@"; do printf "%s\\n" "$a"; done >> "{record}"\n')
    script.chmod(0o755)


def _run(args: list[str], tmp_path: Path, env: dict[str, str] | None = None, token: bool = True):
    home = tmp_path / "home"
    if token:
        (home / ".ray").mkdir(parents=True, exist_ok=True)
        (home / ".ray" / "auth_token").write_text("t" * 32)
    record = tmp_path / "argv.txt"
    _fake(tmp_path / "bin", "ray", record)
    _fake(tmp_path / "bin", "mlflow", record)
    base = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "HOME": str(home)}
    result = subprocess.run(
        [BASH, *args], env={**base, **(env or {})}, cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    lines = record.read_text().splitlines() if record.exists() else None
    return result, lines


def _job_scripts() -> list[Path]:
    return sorted((CLUSTER / "jobs").glob("*.sh"))


@pytest.mark.skipif(BASH is None, reason="needs bash")
@pytest.mark.parametrize("script", _job_scripts(), ids=lambda p: p.name)
def test_job_script_is_valid_bash(script: Path) -> None:
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    subprocess.run([BASH, "-n", str(script)], check=True)
    assert os.access(script, os.X_OK)


def test_there_is_a_job_script_per_stage() -> None:
    assert {p.stem for p in _job_scripts()} == STAGES | {"submit"}


@pytest.mark.skipif(BASH is None, reason="needs bash")
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_job_script_submits_the_stage_with_args_passed_through(stage: str, tmp_path: Path) -> None:
    result, argv = _run([str(CLUSTER / "jobs" / f"{stage}.sh"), "--config", "configs/my exp.yaml", "--x=1"], tmp_path)
    assert result.returncode == 0, result.stderr
    cwd, *args = argv
    assert Path(cwd) == ROOT  # so `--working-dir .` uploads the repository
    assert args[:2] == ["job", "submit"]
    options, entrypoint = args[2 : args.index("--")], args[args.index("--") + 1 :]
    assert _option(shlex.join(options), "--address") == "http://127.0.0.1:8265"
    assert _option(shlex.join(options), "--working-dir") == "."
    assert _option(shlex.join(options), "--runtime-env") == "cluster/runtime_env.yaml"
    assert json.loads(_option(shlex.join(options), "--metadata-json")) == {"stage": stage}
    assert entrypoint == ["python", "-m", f"pipeline.{stage}", "--config", "configs/my exp.yaml", "--x=1"]


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_job_script_takes_address_and_extra_options_from_env(tmp_path: Path) -> None:
    env = {"RAY_ADDRESS": "http://10.0.0.5:8265", "RAY_JOB_OPTS": "--no-wait --entrypoint-num-gpus 1"}
    result, argv = _run([str(CLUSTER / "jobs" / "predict.sh"), "--task", "liver"], tmp_path, env)
    assert result.returncode == 0, result.stderr
    options = shlex.join(argv[1 : argv.index("--")])
    assert _option(options, "--address") == "http://10.0.0.5:8265"
    assert "--no-wait" in argv and _option(options, "--entrypoint-num-gpus") == "1"
    assert argv[argv.index("--") + 1 :] == ["python", "-m", "pipeline.predict", "--task", "liver"]


@pytest.mark.skipif(BASH is None, reason="needs bash")
@pytest.mark.parametrize(
    "env", [{}, {"RAY_AUTH_TOKEN_PATH": "/nonexistent/token"}], ids=["no-token-file", "bad-token-path"]
)
def test_job_script_refuses_to_submit_without_a_token(env: dict[str, str], tmp_path: Path) -> None:
    result, argv = _run([str(CLUSTER / "jobs" / "train.sh")], tmp_path, env, token=False)
    assert result.returncode == 2 and argv is None
    assert "auth token" in result.stderr


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_job_script_accepts_a_token_from_the_environment(tmp_path: Path) -> None:
    result, argv = _run([str(CLUSTER / "jobs" / "train.sh")], tmp_path, {"RAY_AUTH_TOKEN": "t" * 32}, token=False)
    assert result.returncode == 0 and argv is not None, result.stderr


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_submit_rejects_unknown_stage(tmp_path: Path) -> None:
    result, argv = _run([str(CLUSTER / "jobs" / "submit.sh"), "datasets"], tmp_path)
    assert result.returncode == 2 and argv is None
    assert "unknown stage" in result.stderr


# --- MLflow server recipe ------------------------------------------------------------------

_DB = {
    "MLFLOW_BACKEND_STORE_URI": "postgresql://mlflow:SECRET@db:5432/mlflow",
    "MLFLOW_ARTIFACTS_DESTINATION": "s3://b/m",
}


@pytest.mark.skipif(BASH is None, reason="needs bash")
@pytest.mark.parametrize(
    "flags, env, host",
    [([], {}, "127.0.0.1"), (["--open"], {}, "0.0.0.0"), ([], {"MLFLOW_OPEN": "1"}, "0.0.0.0")],
    ids=["default", "flag", "env"],
)
def test_mlflow_server_is_local_unless_opened(flags, env, host, tmp_path: Path) -> None:
    env = {**_DB, "MLFLOW_STATE_DIR": str(tmp_path / "state"), **env}
    result, argv = _run([str(CLUSTER / "mlflow" / "mlflow-server.sh"), *flags], tmp_path, env)
    assert result.returncode == 0, result.stderr
    args = shlex.join(argv[1:])
    assert argv[1] == "server" and _option(args, "--host") == host
    assert "SECRET" not in args and "SECRET" not in result.stderr  # the DB URI travels in the environment


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_mlflow_server_auth_uses_basic_auth_app(tmp_path: Path) -> None:
    env = {**_DB, "MLFLOW_STATE_DIR": str(tmp_path / "state")}
    result, argv = _run([str(CLUSTER / "mlflow" / "mlflow-server.sh"), "--auth", "--port", "5001"], tmp_path, env)
    assert result.returncode == 0, result.stderr
    args = shlex.join(argv[1:])
    assert _option(args, "--app-name") == "basic-auth" and _option(args, "--port") == "5001"
    assert "database_uri = sqlite:///" in (tmp_path / "state" / "basic_auth.ini").read_text()


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_mlflow_server_needs_its_database(tmp_path: Path) -> None:
    result, argv = _run([str(CLUSTER / "mlflow" / "mlflow-server.sh")], tmp_path, {"MLFLOW_STATE_DIR": str(tmp_path)})
    assert result.returncode != 0 and argv is None
    assert "MLFLOW_BACKEND_STORE_URI" in result.stderr


def test_mlflow_systemd_unit_runs_the_script_without_opening_it() -> None:
    unit = (CLUSTER / "mlflow" / "mlflow-server.service").read_text()
    (exec_start,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert exec_start.endswith("cluster/mlflow/mlflow-server.sh")
    assert "EnvironmentFile=/etc/mlflow/mlflow.env" in unit
