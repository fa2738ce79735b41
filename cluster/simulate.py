"""A multi-node Ray cluster on one machine, with S3 and an MLflow server, all on 127.0.0.1.

`make cluster-demo` (`python -m cluster.simulate [--out DIR]`) runs what a real cluster runs,
end to end, and `tests/test_cluster_sim.py` checks it:

- Ray: a head node (1 CPU: the driver and Ray Train's controller) and two worker nodes, node-a
  (1 CPU) and node-b (2 CPUs), each with one unit of the custom resource `trainer`. A training
  worker asks for one (`ray.resources_per_worker: {trainer: 1}`), so two workers run on two
  nodes, never on the head. Nodes are separate raylets with their own processes; removing one
  kills its workers as losing a machine would.
- S3: a moto server; stores (ingest `--out s3://...`) and checkpoints (`ray.storage_path`) live
  there, and every node reaches it through AWS_ENDPOINT_URL.
- MLflow: a real `mlflow server` process (SQLite backend, artifacts stored and served by it).
- An elastic run (`ray.num_workers: [1, 2]`) loses node-b once an epoch has run on both nodes,
  goes on with one worker from the last checkpoint, and grows back to two when node-b returns.
"""

from __future__ import annotations

import argparse
import http.client
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.common.config import ExperimentConfig, IngestConfig, load_config
from pipeline.common.services import environment, free_port, single_machine_mode
from pipeline.common.tracking import TrackedRun
from pipeline.datasets.synthetic import SyntheticTask, write_task
from pipeline.train.run import TrainResult, read_record, run

log = logging.getLogger("cluster.simulate")

VENV_BIN = Path(sys.executable).parent
BUCKET = "uniseg"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
HEAD_CPUS = 1
WORKER_NODES: dict[str, dict[str, Any]] = {
    "node-a": {"num_cpus": 1, "resources": {"trainer": 1}},
    "node-b": {"num_cpus": 2, "resources": {"trainer": 1}},
}
TASKS = (
    SyntheticTask("Task01_SimLiver", ("CT",), ("background", "liver", "tumour"), spacing=(1.5, 1.5, 4.0),
                  shape=(32, 32, 16), num_cases=4, num_test_cases=1),
    SyntheticTask("Task02_SimProstate", ("T2", "ADC"), ("background", "peripheral zone", "transition zone"),
                  spacing=(1.0, 1.0, 3.0), shape=(32, 32, 16), num_cases=4),
)


@contextmanager
def s3_server(bucket: str = BUCKET) -> Iterator[dict[str, str]]:
    """A moto S3 server on a free loopback port with `bucket`; yields the AWS variables that point
    clients (boto3, s3fs, pyarrow) at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = CREDENTIALS | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=bucket)
        yield env
    finally:
        server.stop()


class MlflowServer:
    """`mlflow server` on a free loopback port: runs and registry in SQLite, artifacts stored
    under `folder` and served by the server (clients need no file access). It starts in the
    background; `wait` until it answers."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.log_file = folder / "server.log"
        self.uri = f"http://127.0.0.1:{free_port()}"
        command = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", self.uri.rsplit(":", 1)[1],
                   "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                   "--artifacts-destination", str(folder / "artifacts")]
        with open(self.log_file, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout_s: float = 300) -> None:
        wait_until(lambda: _healthy(f"{self.uri}/health"), timeout_s, f"MLflow server at {self.uri}",
                   alive=lambda: self.process.poll() is None, log_file=self.log_file)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


class SimulatedCluster:
    """ray.cluster_utils.Cluster: the head plus WORKER_NODES, every process on 127.0.0.1."""

    def __init__(self, env: dict[str, str]):
        from ray.cluster_utils import Cluster

        self.env = env
        self.temp_dir = tempfile.mkdtemp(prefix="raysim-", dir="/tmp")  # Ray's socket paths must stay short
        # Every simulated node's raylet sees the whole machine's memory; Ray's per-node memory
        # monitor would kill workers for what the other nodes (and other programs) use: off.
        self.cluster = Cluster(initialize_head=True, head_node_args=self._node_args(
            num_cpus=HEAD_CPUS, gcs_server_port=free_port(), include_dashboard=False, dashboard_port=free_port(),
            temp_dir=self.temp_dir, _system_config={"memory_monitor_refresh_ms": 0}))
        self.nodes: dict[str, Any] = {}
        for name in WORKER_NODES:
            self.add(name)

    def _node_args(self, **args: Any) -> dict[str, Any]:
        # Free ports for everything Ray would otherwise take from fixed defaults, so several
        # clusters (other test runs) can share the machine.
        ports = {name: free_port() for name in ("dashboard_agent_listen_port", "runtime_env_agent_port",
                                                "metrics_agent_port", "metrics_export_port")}
        return {"node_ip_address": "127.0.0.1", "env_vars": self.env, **ports, **args}

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self, name: str) -> None:
        """Start worker node `name` (again) and wait until it is alive."""
        self.nodes[name] = self.cluster.add_node(**self._node_args(**WORKER_NODES[name]))
        log.info("node %s up (%s)", name, self.nodes[name].node_id[:8])

    def remove(self, name: str) -> None:
        """Stop worker node `name` and every process on it."""
        self.cluster.remove_node(self.nodes.pop(name))
        log.info("node %s removed", name)

    def node_names(self, node_ids: list[str]) -> list[str]:
        names = {node.node_id: name for name, node in self.nodes.items()}
        return [names.get(node_id, "head" if node_id == self.cluster.head_node.node_id else node_id[:8])
                for node_id in node_ids]

    def trainer_nodes(self) -> list[str]:
        """Names of the nodes holding the bundles of the live training workers' placement group."""
        import ray

        for group in ray.util.placement_group_table().values():
            if group["state"] == "CREATED" and any("trainer" in b for b in group["bundles"].values()):
                return sorted(self.node_names(list(group["bundles_to_node_id"].values())))
        return []

    def shutdown(self) -> None:
        self.cluster.shutdown()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@contextmanager
def simulated_cluster(env: dict[str, str]) -> Iterator[SimulatedCluster]:
    """The cluster, with this process connected to it as the driver (as `ray job submit` would)."""
    import ray

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    sim = SimulatedCluster(env)
    # After a node is lost Ray Train may first ask for the old number of workers again (its view
    # of free resources lags); it waits this long for their placement before trying fewer.
    job_env = env | {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}
    try:
        with single_machine_mode():  # the cluster listens on 127.0.0.1 only
            ray.init(address=sim.address, runtime_env={"env_vars": job_env})
        yield sim
    finally:
        ray.shutdown()
        sim.shutdown()


@contextmanager
def detached_cluster() -> Iterator[int]:
    """The cluster up, for processes started meanwhile (benchmarks run the stages as commands):
    RAY_ADDRESS points at it and Ray's single-machine mode keeps its 127.0.0.1; yields its CPUs."""
    sim = SimulatedCluster({})
    try:
        with environment({"RAY_ADDRESS": sim.address}), single_machine_mode():
            yield HEAD_CPUS + sum(node["num_cpus"] for node in WORKER_NODES.values())
    finally:
        sim.shutdown()


@dataclass(frozen=True)
class Services:
    sim: SimulatedCluster
    s3_env: dict[str, str]  # the AWS variables that reach the S3 server
    tracking_uri: str


@contextmanager
def cluster_services(folder: Path) -> Iterator[Services]:
    """The S3 server, the MLflow server (starting while the Ray cluster starts) and the cluster,
    with this process connected as the driver. The caller puts `s3_env` into its environment."""
    with s3_server() as env:
        server = MlflowServer(folder / "mlflow")
        try:
            with simulated_cluster(env) as sim:
                server.wait()
                yield Services(sim, env, server.uri)
        finally:
            server.stop()


def write_raw_data(folder: Path) -> list[Path]:
    return [write_task(folder, task) for task in TASKS]


def ingest_to_s3(sources: list[Path], prefix: str = f"s3://{BUCKET}/stores") -> list[str]:
    """Dask ingest straight into S3 (as from a workstation); returns the store URIs."""
    from pipeline.ingest.run import run as ingest

    report = ingest(sources, prefix, IngestConfig(scheduler="threads"))
    if not report.ok:
        raise RuntimeError(f"ingest failed: {[d.summary() for d in report.datasets]}")
    return [d.store for d in report.datasets]


def elastic_config(folder: Path, stores: list[str], tracking_uri: str, name: str = "elastic",
                   epochs: int = 20) -> ExperimentConfig:
    """The tiny preset, elastic over 1-2 workers (one per `trainer` node), everything on S3 and
    the MLflow server; a checkpoint every epoch so a lost node costs at most the epoch it was in.
    Epochs are short (4 iterations); 20 of them leave room for the node to leave and return."""
    raw = {
        "name": name,
        "data": {"stores": stores},
        "model": {"preset": "tiny", "patch_size": [16, 32, 32]},
        "train": {"epochs": epochs, "iterations_per_epoch": 4, "batch_size": 2, "validate_every": epochs,
                  "checkpoint_every": 1, "loader_workers": 0, "precision": "fp32", "log_every": 4},
        "ray": {"num_workers": [1, 2], "cpus_per_worker": 1, "resources_per_worker": {"trainer": 1},
                "storage_path": f"s3://{BUCKET}/ray", "max_failures": 4, "elastic_resize_interval_s": 2},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "cluster-sim", "registered_model": f"{name}-model"},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


@dataclass
class ElasticRun:
    """What happened: the result, and the node events with the epochs logged when they fired."""

    result: TrainResult | None = None
    error: BaseException | None = None
    events: list[str] = field(default_factory=list)
    spanned: list[str] = field(default_factory=list)  # the nodes of the first two-worker group


def world_sizes(cfg: ExperimentConfig) -> dict[int, int]:
    """Epoch -> world size, as the run's MLflow metrics record it so far."""
    record = read_record(f"{cfg.ray.storage_path}/{cfg.name}")
    if record is None or record.mlflow_run_id is None:
        return {}
    history = TrackedRun(cfg.mlflow.tracking_uri, record.mlflow_run_id).metric_history("train/world_size")
    return {step: int(value) for step, value in history}


def train_losing_a_node(sim: SimulatedCluster, cfg: ExperimentConfig, node: str = "node-b",
                        timeout_s: float = 600) -> ElasticRun:
    """Run `cfg` while taking `node` away once an epoch has run on two workers, and bringing it
    back once an epoch has run on one."""
    outcome = ElasticRun()

    def train() -> None:
        try:
            outcome.result = run(cfg)
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            outcome.error = err

    thread = threading.Thread(target=train, name="elastic-train")
    thread.start()
    alive = thread.is_alive
    wait_until(lambda: 2 in world_sizes(cfg).values() and len(sim.trainer_nodes()) == 2, timeout_s,
               "an epoch on two workers", alive)
    outcome.spanned = sim.trainer_nodes()
    outcome.events.append(f"epochs {sorted(world_sizes(cfg))} logged: removing {node}")
    sim.remove(node)
    wait_until(lambda: 1 in world_sizes(cfg).values(), timeout_s, "an epoch on one worker", alive)
    outcome.events.append(f"epochs {sorted(world_sizes(cfg))} logged: adding {node} back")
    sim.add(node)
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"training did not finish within {timeout_s} s")
    return outcome


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, alive: Callable[[], bool] = lambda: True,
               log_file: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if not alive():
            tail = log_file.read_text()[-3000:] if log_file else ""
            raise RuntimeError(f"stopped before {what}{': ' + tail if tail else ''}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout_s} s")
        time.sleep(1)


def _healthy(url: str) -> bool:
    """Whether `url` answers "OK" (another server that took the port answers otherwise)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.read().strip() == b"OK"
    except (OSError, http.client.HTTPException):
        return False


def predict_in_fresh_process(model_uri: str, tracking_uri: str, task: str, scan: Path, out: Path) -> Path:
    """`python -m pipeline.predict` in a new process that knows only the MLflow server's URI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {"MLFLOW_TRACKING_URI": tracking_uri}
    command = [sys.executable, "-m", "pipeline.predict", "--model", model_uri, "--task", task, "-i", str(scan),
               "-o", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"predict failed ({done.returncode}): {done.stderr[-3000:]}")
    return next(out.glob("*.nii.gz"))


def main(argv: list[str] | None = None) -> int:
    from pipeline.common.logs import setup_logging

    parser = argparse.ArgumentParser(prog="python -m cluster.simulate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/cluster-demo"), help="working folder (replaced)")
    args = parser.parse_args(argv)
    setup_logging()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's line per S3 request
    shutil.rmtree(args.out, ignore_errors=True)
    sources = write_raw_data(args.out / "raw")
    with cluster_services(args.out) as services:
        os.environ.update(services.s3_env)  # the driver reads and writes S3 too
        demo(services, sources, args.out)
    return 0


def demo(services: Services, sources: list[Path], out: Path) -> None:
    sim, tracking_uri = services.sim, services.tracking_uri
    log.info("cluster: head + %s on %s; S3 at %s; MLflow at %s", ", ".join(sim.nodes), sim.address,
             services.s3_env["AWS_ENDPOINT_URL"], tracking_uri)
    stores = ingest_to_s3(sources)
    cfg = elastic_config(out, stores, tracking_uri)
    elastic = train_losing_a_node(sim, cfg)
    if elastic.error is not None:
        raise elastic.error
    for event in elastic.events:
        log.info("%s", event)
    log.info("workers spanned %s; world size per epoch: %s", elastic.spanned, world_sizes(cfg))
    scan = next((sources[0] / "imagesTs").glob("*.nii.gz"))
    labels = predict_in_fresh_process(elastic.result.model_uri, tracking_uri, TASKS[0].name, scan, out / "predictions")
    log.info("model %s predicted %s in a fresh process; MLflow UI: %s", elastic.result.model_uri, labels, tracking_uri)


if __name__ == "__main__":
    sys.exit(main())
