"""The pipeline on Kubernetes (deploy/k8s/, docs/kubernetes.md): the `dagster-k8s/config` op tag of
a GPU step, the k8s step executor, the training pod that runs a training job through Dagster Pipes
(the cluster twin of the local accelerate launcher), and the checks of the deployment's files.

dagster, dagster_k8s and kubernetes are imported inside the functions: importing this module is cheap.
Facts taken from dagster-k8s 0.29 (and Dagster's Helm chart) are cited where they are used.
`python -m resources.k8s` prints what is wrong with deploy/k8s/ (nothing: exit 0).
"""
from __future__ import annotations

import copy
import functools
import importlib
import json
import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Any, Sequence

import yaml

from ground.secrets import ENV_NAME, is_secret_key
from ground.settings import PROJECT_ROOT

DEPLOY_DIR = PROJECT_ROOT / "deploy" / "k8s"
# dagster_k8s/job.py: USER_DEFINED_K8S_CONFIG_KEY, the op tag the k8s_job_executor reads for each step
# (get_user_defined_k8s_config); its keys are USER_DEFINED_K8S_JOB_CONFIG_SCHEMA's: container_config,
# pod_spec_config, pod_template_spec_metadata, job_config, job_metadata, job_spec_config, merge_behavior.
K8S_CONFIG_TAG = "dagster-k8s/config"
# The NVIDIA device plugin's extended resource.
GPU = "nvidia.com/gpu"
# The cluster's names; values.yaml, dagster.yaml and cluster.yaml use the same (the tests hold them to it).
NAMESPACE = "safevid"
ENV_CONFIG_MAP = "safevid-env"
SECRET = "safevid-secrets"
DATA_PVC = "safevid-data"
DATA_MOUNT = "/opt/safevid/data"
# The steps that run a model on a GPU, and the training steps (GPU in their own pod, or in a training pod).
GPU_ASSETS = ("target_model", "video_descriptions", "preference_pairs", "benchmark_scores")
TRAINING_ASSETS = ("dpo_checkpoint", "at_sft_checkpoint", "cot_checkpoint", "grpo_checkpoint", "data_scale_ablation")
# `local`: a training job runs in its step's pod (accelerate through PipesSubprocessClient);
# `k8s`: in a pod of its own (run_training_in_k8s). Set in the safevid-env ConfigMap.
TRAINING_LAUNCHER_ENV = "SAFEVID_TRAINING_LAUNCHER"
# `k8s`: every step in a pod of its own (k8s_executor); unset: Dagster's default, steps in the run's pod.
EXECUTOR_ENV = "SAFEVID_EXECUTOR"
# What a training pod reads from the Secret (gated Hugging Face weights).
TRAINING_SECRETS = ("HF_TOKEN",)
# dagster/_core/storage/tags.py: DOCKER_IMAGE_TAG, which the K8sRunLauncher sets on every run it
# launches to the run pod's image (dagster_k8s/launcher.py, _launch_k8s_job_with_args).
RUN_IMAGE_TAG = "dagster/image"


def load_deploy_yaml(name: str) -> Any:
    return yaml.safe_load((DEPLOY_DIR / name).read_text())


@functools.cache
def _gpu_step_config() -> dict:
    return load_deploy_yaml("gpu-op-tags.yaml")


def gpu_op_tags() -> dict:
    """The op tags of a GPU step: {"dagster-k8s/config": deploy/k8s/gpu-op-tags.yaml}, read once;
    each call gets its own copy (Dagster keeps what it is given)."""
    return {K8S_CONFIG_TAG: copy.deepcopy(_gpu_step_config())}


def training_launcher() -> str:
    value = os.environ.get(TRAINING_LAUNCHER_ENV, "local")
    if value not in ("local", "k8s"):
        raise ValueError(f"{TRAINING_LAUNCHER_ENV}={value!r}: expected `local` or `k8s`")
    return value


def training_op_tags() -> dict:
    """A training asset's op tags: the GPU tag while training runs in the step's own pod; none when it
    runs in a training pod (run_training_in_k8s), where a GPU on the waiting step would sit idle."""
    return {} if training_launcher() == "k8s" else gpu_op_tags()


def k8s_executor():
    """dagster_k8s's k8s_job_executor with deploy/k8s/executor.yaml: every step in a Job of its own,
    so a step's `dagster-k8s/config` tag is what puts that step on a GPU node."""
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor.configured(load_deploy_yaml("executor.yaml"), name="k8s_job_executor")


def executor_from_env():
    """The executor of the code location's jobs: k8s_executor() when SAFEVID_EXECUTOR=k8s (the
    safevid-env ConfigMap sets it in the cluster), else None (Dagster's default executor)."""
    value = os.environ.get(EXECUTOR_ENV, "")
    if value not in ("", "k8s"):
        raise ValueError(f"{EXECUTOR_ENV}={value!r}: expected `k8s` or unset")
    return k8s_executor() if value == "k8s" else None


def _scaled(quantity: Any, n: int) -> str:
    """A Kubernetes quantity times n: "8" -> "16", "64Gi" -> "128Gi", "500m" -> "1000m"."""
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", str(quantity))
    if not match:
        raise ValueError(f"cannot scale the quantity {quantity!r}: write it as an integer and a unit")
    return f"{int(match[1]) * n}{match[2]}"


def training_pod(image: str, command: Sequence[str], gpus: int, env_secrets: Sequence[str], secret: str = SECRET) -> dict:
    """The base_pod_spec of a training pod: `command` in `image` on `gpus` GPUs of one node, with the GPU
    step's node selection and per-GPU resources (gpu-op-tags.yaml), the shared data volume, the settings
    ConfigMap, and each name in `env_secrets` read from the Secret `secret` (a secretKeyRef: the value
    never enters the spec)."""
    from dagster_k8s.models import k8s_snake_case_dict
    from kubernetes.client import V1Container, V1PodSpec

    if gpus < 1:
        raise ValueError(f"a training pod needs at least one GPU, got {gpus}")
    bad = [n for n in env_secrets if not ENV_NAME.match(n)]
    if bad:
        raise ValueError(f"not environment variable names: {bad}")
    # The tag may be camelCase or snake_case (dagster_k8s/models.py: k8s_snake_case_dict); here it is one.
    step = _gpu_step_config()
    container_cfg = k8s_snake_case_dict(V1Container, step.get("container_config") or {})
    pod_cfg = k8s_snake_case_dict(V1PodSpec, step.get("pod_spec_config") or {})
    resources = {kind: {k: _scaled(v, gpus) for k, v in values.items()} for kind, values in container_cfg["resources"].items()}
    container = {
        "name": "training",
        "image": image,
        "command": list(command),
        "resources": resources,
        # optional: a key the Secret lacks leaves the variable unset and the job says what it misses,
        # instead of the pod holding its GPUs in CreateContainerConfigError.
        "env": [{"name": n, "value_from": {"secret_key_ref": {"name": secret, "key": n, "optional": True}}} for n in env_secrets],
        "env_from": [{"config_map_ref": {"name": ENV_CONFIG_MAP}}],
        "volume_mounts": [*container_cfg.get("volume_mounts", []), {"name": DATA_PVC, "mount_path": DATA_MOUNT}],
    }
    return {
        **pod_cfg,
        # PipesK8sClient refuses Always (dagster_k8s/pipes.py: build_pod_body); a failed training is
        # Dagster's to retry, as a whole step.
        "restart_policy": "Never",
        "containers": [container],
        "volumes": [*pod_cfg.get("volumes", []), {"name": DATA_PVC, "persistent_volume_claim": {"claim_name": DATA_PVC}}],
    }


def training_pod_meta() -> dict:
    """The training pod's labels and annotations: the GPU step's (no eviction by a scale-down)."""
    return copy.deepcopy(_gpu_step_config().get("pod_template_spec_metadata") or {})


def run_image(context) -> str:
    """The image of the run the step belongs to (the user-code image), for its training pod."""
    image = context.run.tags.get(RUN_IMAGE_TAG) or os.environ.get("DAGSTER_CURRENT_IMAGE")
    if not image:
        raise ValueError(f"no image for the training pod: the run has no {RUN_IMAGE_TAG} tag (not launched by the K8sRunLauncher?) and DAGSTER_CURRENT_IMAGE is unset")
    return image


def run_training_in_k8s(context, command: Sequence[str], extras: dict, image: str | None = None, gpus: int = 1,
                        env_secrets: Sequence[str] = TRAINING_SECRETS, namespace: str | None = None, client=None) -> list:
    """Run a training job in a pod of its own through Dagster Pipes: the command and extras of the local
    launcher (`python -m accelerate.commands.launch ... -m jobs.<method> <spec.json>`, the spec on the
    shared volume), in the run's image unless `image` is given; the step's log shows the job's, and the
    pod is deleted at the end. Returns the job's custom messages (report_custom_message)."""
    from dagster_k8s import PipesK8sClient

    image = image or run_image(context)
    invocation = (client or PipesK8sClient()).run(
        context=context,
        image=image,
        command=list(command),
        extras=extras,
        namespace=namespace,  # None: the namespace of the step's own pod (dagster_k8s/pipes.py)
        base_pod_meta=training_pod_meta(),
        base_pod_spec=training_pod(image, command, gpus, env_secrets),
    )
    return list(invocation.get_custom_messages())


# ---- checks of the deployment's files (tests/test_k8s_deploy.py; `python -m resources.k8s`) ----

def _errors(result) -> list[str]:
    # Dagster's messages end with the whole expected schema; the first sentence says what is wrong.
    return [e.message.split(' Expected: "')[0] for e in result.errors or []]


def _k8s_model_problems(where: str, model: str, value: Any) -> list[str]:
    """What the kubernetes client refuses in `value` as a `model` (V1Volume, V1PodSpec...)."""
    import kubernetes.client
    from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict

    cls = getattr(kubernetes.client, model)
    try:
        k8s_model_from_dict(cls, k8s_snake_case_dict(cls, value))
    except Exception as e:  # the client raises plain Exception/ValueError for unknown keys and bad values
        return [f"{where}: {e}"]
    return []


def run_launcher_problems(config: dict) -> list[str]:
    """What the K8sRunLauncher would refuse in its config (K8sRunLauncher.config_type(), and its volumes,
    mounts and resources as kubernetes objects), without starting it: its constructor connects to a cluster."""
    from dagster._config import validate_config
    from dagster_k8s import K8sRunLauncher

    out = _errors(validate_config(K8sRunLauncher.config_type(), config))
    for i, v in enumerate(config.get("volumes") or []):
        out += _k8s_model_problems(f"volumes[{i}]", "V1Volume", v)
    for i, v in enumerate(config.get("volume_mounts") or []):
        out += _k8s_model_problems(f"volume_mounts[{i}]", "V1VolumeMount", v)
    if config.get("resources"):
        out += _k8s_model_problems("resources", "V1ResourceRequirements", config["resources"])
    return out


def instance_problems(path: Path = DEPLOY_DIR / "dagster.yaml") -> list[str]:
    """What Dagster would refuse in an instance file: its instance schema, then each configurable class's
    own config (as ConfigurableClassData.rehydrate checks it, without starting the class)."""
    from dagster._config import validate_config
    from dagster._core.errors import DagsterInvalidConfigError
    from dagster._core.instance.config import dagster_instance_config

    try:
        config, _ = dagster_instance_config(str(path.parent), path.name)
    except DagsterInvalidConfigError as e:
        return [f"{path.name}: {m}" for m in [str(e).splitlines()[0], *(x.message.split(' Expected: "')[0] for x in e.errors)]]
    out = []
    for key, value in config.items():
        if not (isinstance(value, dict) and "module" in value and "class" in value):
            continue
        try:
            klass = getattr(importlib.import_module(value["module"]), value["class"])
        except (ImportError, AttributeError) as e:
            out.append(f"{key}: {value['module']}.{value['class']} cannot be imported ({e})")
            continue
        if key == "run_launcher" and klass.__name__ == "K8sRunLauncher":
            out += [f"run_launcher.config: {p}" for p in run_launcher_problems(value.get("config") or {})]
        else:
            out += [f"{key}.config: {p}" for p in _errors(validate_config(klass.config_type(), value.get("config") or {}))]
    return out


def executor_problems(config: dict) -> list[str]:
    """What the k8s_job_executor refuses in its config (dagster_k8s/executor.py: _K8S_EXECUTOR_CONFIG_SCHEMA)."""
    from dagster._config import validate_config
    from dagster_k8s import k8s_job_executor

    out = _errors(validate_config(k8s_job_executor.config_schema.config_type, config))
    if "step_k8s_config" in config and not out:
        out += gpu_free_tag_problems(config["step_k8s_config"], "step_k8s_config")
    return out


def gpu_free_tag_problems(config: dict, where: str = K8S_CONFIG_TAG) -> list[str]:
    """What dagster-k8s refuses in a `dagster-k8s/config` tag: the tag's schema, then each part as the
    kubernetes object it configures (get_user_defined_k8s_config, as the executor reads a step's tags)."""
    from dagster_k8s.job import get_user_defined_k8s_config

    try:
        get_user_defined_k8s_config({K8S_CONFIG_TAG: json.dumps(config)})
    except Exception as e:  # DagsterInvalidConfigError for the schema, Exception for a key kubernetes lacks
        return [f"{where}: {e}".split(' Expected: "')[0]]
    return []


def gpu_tag_problems(config: dict) -> list[str]:
    """What stops a `dagster-k8s/config` tag from putting its step on a GPU: dagster-k8s refuses it,
    or it asks for no whole GPU as a limit (an extended resource is scheduled by its limit, and a
    request, when given, must equal it)."""
    out = gpu_free_tag_problems(config)
    if out:
        return out
    resources = (config.get("container_config") or {}).get("resources") or {}
    limit, request = (resources.get("limits") or {}).get(GPU), (resources.get("requests") or {}).get(GPU)
    if limit is None:
        return [f"container_config.resources.limits has no {GPU}: the step would get no GPU"]
    if not str(limit).isdigit() or int(limit) < 1:
        out.append(f"container_config.resources.limits.{GPU} is {limit!r}: a whole number of GPUs, at least 1")
    if request is not None and str(request) != str(limit):
        out.append(f"{GPU}: request {request!r} differs from limit {limit!r}; Kubernetes refuses such a pod")
    return out


def literal_secrets(doc: Any, path: str = "") -> list[str]:
    """Paths in a YAML document where a secret-looking key holds a literal value, or an env entry named
    like a secret has a `value`: secrets come from k8s Secrets or {env: NAME}, never from these files."""
    out = []
    if isinstance(doc, dict):
        if is_secret_key(str(doc.get("name", ""))) and "value" in doc:
            out.append(f"{path}.value")
        for key, value in doc.items():
            where = f"{path}.{key}" if path else str(key)
            # ...Secret / ...SecretName / ...secrets name a Secret object, not its content.
            names_a_secret = re.search(r"secret(s|_?name)?$", str(key), re.IGNORECASE)
            if is_secret_key(str(key)) and not names_a_secret and isinstance(value, (str, int, float)) and value != "":
                out.append(where)
            out += literal_secrets(value, where)
    elif isinstance(doc, list):
        for i, item in enumerate(doc):
            out += literal_secrets(item, f"{path}[{i}]")
    return out


# The keys of runLauncher.config.k8sRunLauncher that the chart's template reads, and the K8sRunLauncher
# key each becomes (dagster's helm/dagster/templates/helpers/instance/_run-launcher.tpl). The template
# skips any other key without a word: a misspelled one would vanish from the deployment.
HELM_RUN_LAUNCHER_KEYS = {
    "loadInclusterConfig": "load_incluster_config",
    "kubeconfigFile": "kubeconfig_file",
    "jobNamespace": "job_namespace",
    "imagePullPolicy": "image_pull_policy",
    "image": "job_image",
    "envConfigMaps": "env_config_maps",
    "envSecrets": "env_secrets",
    "envVars": "env_vars",
    "volumeMounts": "volume_mounts",
    "volumes": "volumes",
    "labels": "labels",
    "resources": "resources",
    "failPodOnRunFailure": "fail_pod_on_run_failure",
    "schedulerName": "scheduler_name",
    "securityContext": "security_context",
    "runK8sConfig": "run_k8s_config",
}
HELM_RUN_K8S_CONFIG_KEYS = {
    "containerConfig": "container_config",
    "podSpecConfig": "pod_spec_config",
    "podTemplateSpecMetadata": "pod_template_spec_metadata",
    "jobSpecConfig": "job_spec_config",
    "jobMetadata": "job_metadata",
}
# The chart's enums (helm/dagster/schema/.../subschema/run_launcher.py, compute_log_manager.py, kubernetes.py).
HELM_RUN_LAUNCHERS = {"K8sRunLauncher": "k8sRunLauncher", "CeleryK8sRunLauncher": "celeryK8sRunLauncher", "CustomRunLauncher": "customRunLauncher"}
HELM_COMPUTE_LOG_MANAGERS = {"NoOpComputeLogManager", "AzureBlobComputeLogManager", "GCSComputeLogManager", "S3ComputeLogManager", "CustomComputeLogManager"}
PULL_POLICIES = {"Always", "IfNotPresent", "Never"}


def _names(refs: list) -> list[str]:
    # The template keeps only entries with a `name` key (`hasKey $envSecret "name"`).
    return [r["name"] for r in refs if isinstance(r, dict) and "name" in r]


def helm_run_launcher(values: dict, release: str = "dagster", namespace: str = NAMESPACE) -> dict:
    """The K8sRunLauncher config the chart renders into the instance's dagster.yaml from `values`
    (release `release` in `namespace`), after _run-launcher.tpl; chart defaults where values are silent."""
    cfg = values["runLauncher"]["config"]["k8sRunLauncher"]
    glob = values.get("global") or {}
    out = {
        "load_incluster_config": cfg.get("loadInclusterConfig", True),
        "job_namespace": cfg.get("jobNamespace") or namespace,
        "image_pull_policy": cfg.get("imagePullPolicy", "Always"),
        "service_account_name": glob.get("serviceAccountName") or (values.get("serviceAccount") or {}).get("name") or release,
        "dagster_home": glob.get("dagsterHome", "/opt/dagster/dagster_home"),
        "instance_config_map": f"{release}-instance",
        "postgres_password_secret": glob.get("postgresqlSecretName", "dagster-postgresql-secret"),
    }
    for helm_key, key in HELM_RUN_LAUNCHER_KEYS.items():
        value = cfg.get(helm_key)
        if not value or key in out:
            continue
        if helm_key in ("envConfigMaps", "envSecrets"):
            value = _names(value)
        elif helm_key == "image":
            value = f"{value['repository']}:{value['tag']}"
        elif helm_key == "runK8sConfig":
            value = {HELM_RUN_K8S_CONFIG_KEYS[k]: v for k, v in value.items() if k in HELM_RUN_K8S_CONFIG_KEYS and v}
        out[key] = value
    return out


def _user_deployment_problems(i: int, d: dict, pyproject: dict) -> list[str]:
    where = f"dagster-user-deployments.deployments[{i}]"
    out = []
    image = d.get("image") or {}
    if not image.get("repository") or not image.get("tag"):
        out.append(f"{where}.image needs a repository and a tag")
    elif str(image["tag"]) == "latest":
        out.append(f"{where}.image.tag is `latest`: the steps of one run could run different code")
    if image.get("pullPolicy", "IfNotPresent") not in PULL_POLICIES:
        out.append(f"{where}.image.pullPolicy {image.get('pullPolicy')!r} is not one of {sorted(PULL_POLICIES)}")
    if ("dagsterApiGrpcArgs" in d) == ("codeServerArgs" in d):
        out.append(f"{where}: give exactly one of dagsterApiGrpcArgs and codeServerArgs")
    args = d.get("dagsterApiGrpcArgs") or d.get("codeServerArgs") or []
    module = next((args[j + 1] for j, a in enumerate(args[:-1]) if a in ("-m", "--module-name")), None)
    if module != pyproject["module_name"]:
        out.append(f"{where} serves module {module!r}, not the project's {pyproject['module_name']!r} (pyproject.toml)")
    if d.get("name") != pyproject["code_location_name"]:
        out.append(f"{where}.name {d.get('name')!r} is not the location name {pyproject['code_location_name']!r}")
    if not isinstance(d.get("port"), int):
        out.append(f"{where}.port must be a number")
    for key in ("envConfigMaps", "envSecrets"):
        if len(_names(d.get(key) or [])) != len(d.get(key) or []):
            out.append(f"{where}.{key}: every entry is {{name: ...}}; the chart skips the others")
    return out


def helm_values_problems(values: dict) -> list[str]:
    """What is wrong with Helm values for this project: the keys the chart reads (a misspelled key is
    dropped by the chart without a word), the code location, the run launcher (rendered as the chart does,
    then checked as the K8sRunLauncher checks it), and any literal secret."""
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["dagster"]
    out = [f"literal secret at {p}" for p in literal_secrets(values)]
    user = values.get("dagster-user-deployments") or {}
    if not (user.get("enabled") and user.get("deployments")):
        out.append("dagster-user-deployments: enabled, with at least one deployment (the project's code location)")
    for i, d in enumerate(user.get("deployments") or []):
        out += _user_deployment_problems(i, d, pyproject)
    launcher = values.get("runLauncher") or {}
    if launcher.get("type") != "K8sRunLauncher":
        return out + [f"runLauncher.type is {launcher.get('type')!r}; this deployment uses K8sRunLauncher (one of {sorted(HELM_RUN_LAUNCHERS)})"]
    cfg = (launcher.get("config") or {}).get("k8sRunLauncher")
    if not isinstance(cfg, dict):
        return out + ["runLauncher.config.k8sRunLauncher is missing"]
    out += [f"runLauncher.config.k8sRunLauncher.{k}: not a key the chart reads" for k in sorted(set(cfg) - set(HELM_RUN_LAUNCHER_KEYS))]
    out += [f"runLauncher.config.k8sRunLauncher.runK8sConfig.{k}: not a key the chart reads"
            for k in sorted(set(cfg.get("runK8sConfig") or {}) - set(HELM_RUN_K8S_CONFIG_KEYS))]
    for key in ("envConfigMaps", "envSecrets"):
        if len(_names(cfg.get(key) or [])) != len(cfg.get(key) or []):
            out.append(f"runLauncher.config.k8sRunLauncher.{key}: every entry is {{name: ...}}; the chart skips the others")
    out += [f"runLauncher (as rendered): {p}" for p in run_launcher_problems(helm_run_launcher(values))]
    logs = (values.get("computeLogManager") or {}).get("type", "NoOpComputeLogManager")
    if logs not in HELM_COMPUTE_LOG_MANAGERS:
        out.append(f"computeLogManager.type {logs!r} is not one of {sorted(HELM_COMPUTE_LOG_MANAGERS)}")
    return out


def cluster_problems(docs: list[dict]) -> list[str]:
    """What the kubernetes client refuses in cluster.yaml's objects, and any literal secret in them."""
    out = []
    for doc in docs:
        kind = doc.get("kind", "")
        out += _k8s_model_problems(f"{kind} {doc.get('metadata', {}).get('name')}", f"V1{kind}", doc) if kind else ["a document without a kind"]
        out += [f"literal secret at {kind}.{p}" for p in literal_secrets(doc)]
    return out


def deploy_problems() -> list[str]:
    """Everything wrong with deploy/k8s/ (an empty list when it is fit to deploy)."""
    out = [f"dagster.yaml: {p}" for p in instance_problems()]
    out += [f"values.yaml: {p}" for p in helm_values_problems(load_deploy_yaml("values.yaml"))]
    out += [f"executor.yaml: {p}" for p in executor_problems(load_deploy_yaml("executor.yaml"))]
    out += [f"gpu-op-tags.yaml: {p}" for p in gpu_tag_problems(load_deploy_yaml("gpu-op-tags.yaml"))]
    out += [f"cluster.yaml: {p}" for p in cluster_problems([d for d in yaml.safe_load_all((DEPLOY_DIR / "cluster.yaml").read_text()) if d])]
    for name in ("dagster.yaml", "executor.yaml", "gpu-op-tags.yaml"):
        out += [f"{name}: literal secret at {p}" for p in literal_secrets(load_deploy_yaml(name))]
    return out


if __name__ == "__main__":
    problems = deploy_problems()
    print("\n".join(problems) or f"{DEPLOY_DIR.relative_to(PROJECT_ROOT)}: no problems")
    sys.exit(1 if problems else 0)
