"""Declared, locked and checked dependencies (issue 22, item 3).

- Every module that pipeline/, model/ and cluster/ import is a declared dependency of
  pyproject.toml (cluster/ may also use the `test` extra: `make cluster-demo` runs in the test
  venv). Import names map to distributions through importlib.metadata.packages_distributions().
- requirements.lock pins every declared dependency at a version its specifier admits, and
  leaves torch out (its build is chosen per machine; the Makefile and the cluster YAMLs name it).
- The private Ray APIs the code leans on still exist in the installed Ray, and pyproject's Ray
  range admits the installed Ray; a new private use in the code fails until it is checked here.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import inspect
import re
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"pipeline", "model", "cluster", "tests"}
PACKAGES = ("pipeline", "model")  # installed code: project dependencies only
TOOLS = ("cluster",)  # run from the checkout in the test venv: project + `test` dependencies
# Declared but never imported by name: what uses them, so they are not dead weight.
USED_WITHOUT_IMPORT = {
    "optuna": "Ray Tune's OptunaSearch (pipeline/tune/run.py imports ray.tune.search.optuna)",
    "s3fs": "fsspec's s3:// protocol (stores and checkpoints on S3)",
    "pytest": "the test runner",
    "moto": "tests' S3 server",
}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _declared(extra: str | None = None) -> dict[str, Requirement]:
    project = _pyproject()["project"]
    specs = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return {_normalise(r.name): r for r in map(Requirement, specs)}


def _third_party_imports(folder: str) -> Iterator[tuple[str, str]]:
    """(top-level module, file) for each absolute import outside the standard library and us."""
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY and top != "__future__":
                    yield top, str(path.relative_to(ROOT))


def _undeclared(folders: tuple[str, ...], declared: set[str]) -> list[str]:
    distributions = importlib.metadata.packages_distributions()
    problems = []
    for module, path in sorted(set(i for f in folders for i in _third_party_imports(f))):
        providers = {_normalise(d) for d in distributions.get(module, [])}
        if not providers:
            problems.append(f"{path}: imports {module!r}, which no installed distribution provides")
        elif not providers & declared:
            problems.append(f"{path}: imports {module!r} (distribution {' or '.join(sorted(providers))}), "
                            "not declared in pyproject.toml")
    return problems


def test_every_import_is_a_declared_dependency() -> None:
    project = set(_declared())
    problems = _undeclared(PACKAGES, project) + _undeclared(TOOLS, project | set(_declared("test")))
    assert not problems, "\n".join(problems)


def test_every_declared_dependency_is_used() -> None:
    distributions = importlib.metadata.packages_distributions()
    imported = {_normalise(d) for f in PACKAGES + TOOLS for module, _ in _third_party_imports(f)
                for d in distributions.get(module, [])}
    unused = set(_declared()) | set(_declared("test"))
    unused -= imported | {_normalise(n) for n in USED_WITHOUT_IMPORT}
    assert not unused, f"declared in pyproject.toml but imported nowhere: {sorted(unused)} " \
                       "(drop them, or say in USED_WITHOUT_IMPORT what uses them)"


def _lock() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)==(\S+)", line)
        if match:
            pins[_normalise(match[1])] = Version(match[2])
    return pins


def test_lock_pins_every_declared_dependency_within_its_range() -> None:
    pins = _lock()
    problems = []
    for name, requirement in (_declared() | _declared("test")).items():
        if name == "torch":
            assert name not in pins, "requirements.lock pins torch; its build is chosen per machine (Makefile)"
        elif name not in pins:
            problems.append(f"{name}: declared in pyproject.toml, not in requirements.lock")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{name}: requirements.lock pins {pins[name]}, pyproject.toml asks {requirement.specifier}")
    assert not problems, "\n".join(problems) + "\nrun `make lock` (README, Dependencies)"


def test_makefile_and_cluster_yamls_install_from_the_lock() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-r requirements\.lock", makefile)
    torch_pin = re.search(r"^TORCH := (torch==\S+)$", makefile, re.M)[1]
    for name in ("aws-gpu.yaml", "onprem.yaml"):
        setup = (ROOT / "cluster" / name).read_text().split("setup_commands:", 1)[1]
        installs = [line for line in setup.splitlines() if "pip install" in line and not line.lstrip().startswith("#")]
        assert installs and all("-c ~/uniseg/requirements.lock" in line for line in installs), (name, installs)
        assert any(torch_pin in line for line in installs), f"{name}: no install names {torch_pin}"


# --- private Ray APIs -------------------------------------------------------------------------


def _ray_constants_single_machine_mode() -> None:
    from ray._private import ray_constants, services

    assert isinstance(ray_constants.ENABLE_RAY_CLUSTER, bool)
    assert ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR == "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    # services.single_machine_mode flips the module attribute: Ray must read it at call time.
    assert "ray_constants.ENABLE_RAY_CLUSTER" in inspect.getsource(services.get_node_ip_address)


def _torch_backend() -> None:
    from ray.train._internal.base_worker_group import BaseWorkerGroup
    from ray.train.backend import Backend
    from ray.train.torch.config import TorchConfig, _set_torch_distributed_env_vars, _TorchBackend

    assert issubclass(_TorchBackend, Backend) and TorchConfig().backend_cls is _TorchBackend
    assert list(inspect.signature(_TorchBackend.on_start).parameters) == ["self", "worker_group", "backend_config"]
    assert not [p for p in inspect.signature(_set_torch_distributed_env_vars).parameters.values()
                if p.default is inspect.Parameter.empty]
    for method in ("execute", "execute_single", "execute_single_async", "__len__"):
        assert callable(getattr(BaseWorkerGroup, method, None)), f"BaseWorkerGroup.{method}"


def _train_report_logger() -> None:
    from pipeline.common.logs import _RAY_REPORT_LOGGER_MODULE

    spec = importlib.util.find_spec(_RAY_REPORT_LOGGER_MODULE)
    assert spec is not None and spec.origin
    assert "logging.getLogger(__file__)" in Path(spec.origin).read_text()  # quiet_ray_train_reports' key


# Every private Ray name the code uses (module, or module:name) -> the check of what it relies on.
RAY_PRIVATE_USES: dict[str, Callable[[], None]] = {
    "ray._private": _ray_constants_single_machine_mode,  # pipeline/common/services.py
    "ray.train.torch.config:_TorchBackend": _torch_backend,  # pipeline/train/process_group.py
    "ray.train.torch.config:_set_torch_distributed_env_vars": _torch_backend,
    "ray.train.v2._internal.execution.context": _train_report_logger,  # pipeline/common/logs.py
}


def _private_ray_uses() -> set[str]:
    """Private Ray modules and names the installed code imports or names in a string."""
    found = set()
    for folder in PACKAGES:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ray"):
                    if any(part.startswith("_") for part in node.module.split(".")):
                        found.add(node.module)
                    found |= {f"{node.module}:{a.name}" for a in node.names if a.name.startswith("_")}
                elif isinstance(node, ast.Import):
                    found |= {a.name for a in node.names if a.name.startswith("ray.") and "._" in a.name}
                elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                    if re.fullmatch(r"ray(\.\w+)+", node.value) and "._" in node.value:
                        found.add(node.value)
    return found


def test_every_private_ray_use_is_checked() -> None:
    unchecked = _private_ray_uses() - set(RAY_PRIVATE_USES)
    assert not unchecked, f"private Ray APIs used but not checked in RAY_PRIVATE_USES: {sorted(unchecked)}"


@pytest.mark.parametrize("use", sorted(RAY_PRIVATE_USES))
def test_ray_private_apis_still_exist(use: str) -> None:
    import ray

    try:
        RAY_PRIVATE_USES[use]()
    except (ImportError, AttributeError, AssertionError, TypeError, OSError) as err:
        pytest.fail(f"Ray {ray.__version__}: the private API {use} moved or changed ({type(err).__name__}: {err}); "
                    f"the code using it was tested with Ray {_declared()['ray'].specifier} (pyproject.toml). "
                    "Adapt that code, or keep Ray in that range", pytrace=False)


def test_installed_ray_is_in_the_tested_range() -> None:
    import ray

    installed, allowed = Version(ray.__version__), _declared()["ray"].specifier
    assert allowed.contains(installed), (
        f"Ray {installed} is installed, pyproject.toml allows {allowed}: if the suite (private-API checks "
        "included) passes on it, widen the range and run `make lock LOCK_ARGS='--upgrade-package ray'`")
