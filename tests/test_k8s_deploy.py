"""The Kubernetes deployment (deploy/k8s/, resources/k8s.py) checked without a cluster: the instance file
against Dagster's instance schema and the K8sRunLauncher's own, the Helm values as the chart reads them,
the GPU op tag along the k8s_job_executor's own path to a Job, the training pod as the kubernetes client
and PipesK8sClient build it. Each check is shown to refuse a broken file too."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from resources import k8s

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "k8s"


def load(name):
    return yaml.safe_load((DEPLOY / name).read_text())


def broken(doc, path, value):
    """A deep copy of `doc` with the key at `path` (a list of keys and indexes) set to `value`;
    a value of DELETE removes it."""
    doc = json.loads(json.dumps(doc))
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


DELETE = object()


def renamed(doc, path, new_key):
    doc = json.loads(json.dumps(doc))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[new_key] = node.pop(path[-1])
    return doc


# ---- the instance (dagster.yaml) ----

def test_the_instance_file_passes_dagsters_schemas():
    from dagster_k8s import K8sRunLauncher

    assert k8s.instance_problems() == []
    instance = load("dagster.yaml")
    launcher = instance["run_launcher"]
    assert getattr(__import__(launcher["module"]), launcher["class"]) is K8sRunLauncher
    # The Postgres password only as a reference to the variable the run launcher fills from a Secret.
    assert instance["storage"]["postgres"]["postgres_db"]["password"] == {"env": "DAGSTER_PG_PASSWORD"}
    assert k8s.literal_secrets(instance) == []


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda d: renamed(d, ["run_launcher", "config", "job_namespace"], "job_namespce"), 'unexpected config entry "job_namespce"'),
        (lambda d: broken(d, ["run_launcher", "config", "instance_config_map"], DELETE), "instance_config_map"),
        (lambda d: renamed(d, ["run_coordinator"], "run_cordinator"), "run_cordinator"),
        (lambda d: broken(d, ["run_launcher", "class"], "K8sRunLauncherr"), "cannot be imported"),
        (lambda d: broken(d, ["run_coordinator", "config", "max_concurrent_runs"], "four"), "max_concurrent_runs"),
        (lambda d: broken(d, ["run_launcher", "config", "volume_mounts", 0], {"name": "safevid-data", "mountPth": "/x"}), "volume_mounts[0]"),
        (lambda d: broken(d, ["storage", "postgres", "postgres_db", "port"], "five"), "port"),
    ],
)
def test_a_broken_instance_file_is_refused(tmp_path, change, expected):
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(change(load("dagster.yaml"))))
    problems = k8s.instance_problems(tmp_path / "dagster.yaml")
    assert any(expected in p for p in problems), problems


# ---- the Helm values (values.yaml) ----

def test_the_helm_values_are_what_the_chart_reads():
    values = load("values.yaml")
    assert k8s.helm_values_problems(values) == []
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["image"]["repository"] and deployment["image"]["tag"] != "latest"
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["generatePostgresqlPasswordSecret"] is False  # else the chart wants the password in this file


def test_helm_and_the_plain_instance_file_launch_runs_alike():
    """Deployed with Helm or with dagster.yaml, runs get the same K8sRunLauncher config."""
    assert k8s.helm_run_launcher(load("values.yaml")) == load("dagster.yaml")["run_launcher"]["config"]


K8S_LAUNCHER = ["runLauncher", "config", "k8sRunLauncher"]
DEPLOYMENT = ["dagster-user-deployments", "deployments", 0]


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda v: renamed(v, [*K8S_LAUNCHER, "envSecrets"], "envSecret"), "k8sRunLauncher.envSecret: not a key the chart reads"),
        (lambda v: broken(v, [*K8S_LAUNCHER, "envSecrets"], ["safevid-secrets"]), "the chart skips the others"),
        (lambda v: broken(v, [*K8S_LAUNCHER, "volumeMounts", 0, "mountPth"], "/x"), "volume_mounts[0]"),
        (lambda v: broken(v, [*K8S_LAUNCHER, "failPodOnRunFailure"], "yes"), "fail_pod_on_run_failure"),
        (lambda v: broken(v, ["runLauncher", "type"], "CeleryK8sRunLauncher"), "uses K8sRunLauncher"),
        (lambda v: broken(v, [*DEPLOYMENT, "image", "tag"], "latest"), "tag is `latest`"),
        (lambda v: broken(v, [*DEPLOYMENT, "dagsterApiGrpcArgs", 1], "definitions"), "not the project's 'dagster_project.definitions'"),
        (lambda v: broken(v, [*DEPLOYMENT, "env"], [{"name": "OPENAI_API_KEY", "value": "sk-123"}]), "literal secret at dagster-user-deployments.deployments[0].env[0].value"),
        (lambda v: broken(v, ["postgresql", "postgresqlPassword"], "hunter2"), "literal secret at postgresql.postgresqlPassword"),
        (lambda v: broken(v, ["computeLogManager", "type"], "LocalComputeLogManager"), "computeLogManager.type"),
    ],
)
def test_broken_helm_values_are_refused(change, expected):
    problems = k8s.helm_values_problems(change(load("values.yaml")))
    assert any(expected in p for p in problems), problems


# ---- the GPU op tag (gpu-op-tags.yaml) and the step executor (executor.yaml) ----

def step_job(op_tags):
    """The Kubernetes Job the k8s_job_executor would make for an asset's step with `op_tags`: the tag
    read from the op as the executor reads it, merged onto executor.yaml's step_k8s_config
    (dagster_k8s/executor.py: K8sStepHandler._get_container_context), built by construct_dagster_k8s_job."""
    import dagster as dg
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

    @dg.asset(op_tags=op_tags)
    def gpu_step():
        pass

    step = UserDefinedDagsterK8sConfig.from_dict(load("executor.yaml")["step_k8s_config"])
    context = K8sContainerContext(run_k8s_config=step).merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(gpu_step.op.tags)))
    job_config = DagsterK8sJobConfig(job_image="registry.example.com/safevid-pipeline:0.1.0", dagster_home="/opt/dagster/dagster_home", instance_config_map="dagster-instance")
    return construct_dagster_k8s_job(job_config, ["dagster", "api", "execute_step"], "dagster-step-x", context.run_k8s_config, component="step_worker")


def test_a_gpu_step_gets_a_gpu_node():
    tags = k8s.gpu_op_tags()
    assert list(tags) == ["dagster-k8s/config"] and k8s.gpu_tag_problems(tags["dagster-k8s/config"]) == []
    pod = step_job(tags).spec.template.spec
    resources = pod.containers[0].resources
    assert resources.limits["nvidia.com/gpu"] == resources.requests["nvidia.com/gpu"] == "1"
    assert resources.requests["cpu"] == "8"  # the tag wins over the executor's default for every step
    assert pod.node_selector == {"nvidia.com/gpu.present": "true"}
    assert any(t.key == "nvidia.com/gpu" for t in pod.tolerations)
    assert "/dev/shm" in {m.mount_path for m in pod.containers[0].volume_mounts}


def test_a_step_without_the_tag_gets_no_gpu():
    resources = step_job({}).spec.template.spec.containers[0].resources
    assert "nvidia.com/gpu" not in (resources.limits or {}) and resources.requests["cpu"] == "1"


def test_the_tag_is_read_once_and_handed_out_as_copies():
    first = k8s.gpu_op_tags()
    first["dagster-k8s/config"]["container_config"]["resources"]["limits"]["nvidia.com/gpu"] = "99"
    assert k8s.gpu_op_tags()["dagster-k8s/config"]["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1"


GPU_TAG = ["container_config", "resources"]


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda t: broken(t, [*GPU_TAG, "limits", "nvidia.com/gpu"], DELETE), "limits has no nvidia.com/gpu"),
        (lambda t: broken(t, [*GPU_TAG, "limits"], DELETE), "limits has no nvidia.com/gpu"),
        (lambda t: broken(t, [*GPU_TAG, "requests", "nvidia.com/gpu"], "2"), "differs from limit"),
        (lambda t: broken(t, [*GPU_TAG, "limits", "nvidia.com/gpu"], "0.5"), "a whole number of GPUs"),
        (lambda t: renamed(t, ["container_config"], "container_conifg"), "container_conifg"),
        (lambda t: renamed(t, ["container_config", "resources"], "resource"), "Unexpected keys in model class V1Container"),
        (lambda t: renamed(t, ["pod_spec_config", "node_selector"], "nodeSelectr"), "Unexpected keys in model class V1PodSpec"),
    ],
)
def test_a_broken_gpu_tag_is_refused(change, expected):
    problems = k8s.gpu_tag_problems(change(load("gpu-op-tags.yaml")))
    assert any(expected in p for p in problems), problems


def test_the_executor_config_is_the_k8s_job_executors():
    assert k8s.executor_problems(load("executor.yaml")) == []
    import dagster as dg

    @dg.asset
    def step():
        pass

    job = dg.Definitions(assets=[step], executor=k8s.k8s_executor()).resolve_implicit_global_asset_job_def()
    resolved = job.executor_def.config_schema.resolve_config({})  # how a run's config reaches the executor
    assert job.executor_def.name == "k8s_job_executor" and resolved.success
    assert resolved.value["config"]["max_concurrent"] == load("executor.yaml")["max_concurrent"]
    assert k8s.executor_problems({"max_concurent": 6}) and k8s.executor_problems({"step_k8s_config": {"container_config": {"resource": {}}}})


def test_the_cluster_picks_the_k8s_executor(monkeypatch):
    monkeypatch.delenv("SAFEVID_EXECUTOR", raising=False)
    assert k8s.executor_from_env() is None
    monkeypatch.setenv("SAFEVID_EXECUTOR", "k8s")
    assert k8s.executor_from_env().name == "k8s_job_executor"
    assert {d["data"].get("SAFEVID_EXECUTOR") for d in cluster_docs() if d["kind"] == "ConfigMap"} == {"k8s"}
    monkeypatch.setenv("SAFEVID_EXECUTOR", "celery")
    with pytest.raises(ValueError, match="expected `k8s` or unset"):
        k8s.executor_from_env()


def test_training_assets_drop_the_gpu_tag_when_training_runs_in_its_own_pod(monkeypatch):
    monkeypatch.delenv("SAFEVID_TRAINING_LAUNCHER", raising=False)
    assert k8s.training_op_tags() == k8s.gpu_op_tags()
    monkeypatch.setenv("SAFEVID_TRAINING_LAUNCHER", "k8s")
    assert k8s.training_op_tags() == {}
    monkeypatch.setenv("SAFEVID_TRAINING_LAUNCHER", "kubernetes")
    with pytest.raises(ValueError, match="expected `local` or `k8s`"):
        k8s.training_op_tags()


def test_the_graph_puts_the_gpu_tag_on_exactly_the_gpu_assets():
    from dagster_project.definitions import defs

    tagged = {k.to_user_string() for a in defs.assets for k in a.keys if k8s.K8S_CONFIG_TAG in (a.op.tags or {})}
    assert tagged == {*k8s.GPU_ASSETS, *k8s.TRAINING_ASSETS}


# ---- the training pod (PipesK8sClient) ----

COMMAND = ["python", "-m", "accelerate.commands.launch", "--num_processes", "4", "-m", "jobs.dpo", "/opt/safevid/data/runs/x/spec.json"]


def built_pod(spec):
    """The V1Pod PipesK8sClient.run would create from this base_pod_spec (dagster_k8s/pipes.py: build_pod_body)."""
    from dagster_k8s.pipes import build_pod_body

    return build_pod_body("dagster-pipes-x", None, None, {"DAGSTER_PIPES_CONTEXT": "ctx"}, k8s.training_pod_meta(), spec)


def test_the_training_pod_is_a_valid_pod_on_its_gpus(monkeypatch):
    import kubernetes

    monkeypatch.setenv("HF_TOKEN", "hf_sentinel_never_in_a_spec")
    spec = k8s.training_pod("registry.example.com/safevid-pipeline:0.1.0", COMMAND, 4, ["HF_TOKEN", "OPENAI_API_KEY"])
    pod = built_pod(spec)
    container = pod.spec.containers[0]
    assert container.command == COMMAND and container.image.endswith(":0.1.0")
    assert container.resources.limits["nvidia.com/gpu"] == container.resources.requests["nvidia.com/gpu"] == "4"
    assert container.resources.limits["memory"] == "256Gi"  # per GPU, times four
    assert pod.spec.node_selector == {"nvidia.com/gpu.present": "true"} and pod.spec.restart_policy == "Never"
    assert {m.mount_path for m in container.volume_mounts} == {"/dev/shm", k8s.DATA_MOUNT}
    assert pod.metadata.annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    secrets = {e.name: e.value_from.secret_key_ref for e in container.env if e.value_from}
    assert {n: (r.name, r.key) for n, r in secrets.items()} == {"HF_TOKEN": ("safevid-secrets", "HF_TOKEN"), "OPENAI_API_KEY": ("safevid-secrets", "OPENAI_API_KEY")}
    # Only Pipes' own bootstrap variable is a literal; no secret value anywhere in what goes to the API.
    assert [e.name for e in container.env if e.value is not None] == ["DAGSTER_PIPES_CONTEXT"]
    sent = json.dumps(kubernetes.client.ApiClient().sanitize_for_serialization(pod))
    assert "hf_sentinel" not in sent and k8s.literal_secrets(spec) == []


def test_a_broken_training_pod_is_refused():
    with pytest.raises(ValueError, match="at least one GPU"):
        k8s.training_pod("img:1", COMMAND, 0, [])
    with pytest.raises(ValueError, match="not environment variable names"):
        k8s.training_pod("img:1", COMMAND, 1, ["hf-token"])
    spec = k8s.training_pod("img:1", COMMAND, 1, [])
    spec["containers"][0]["resources"]["limitz"] = spec["containers"][0]["resources"].pop("limits")
    with pytest.raises(Exception, match="Unexpected keys in model class V1ResourceRequirements"):
        built_pod(spec)


class FakeRun:
    def __init__(self, tags):
        self.tags = tags


class FakeContext:
    def __init__(self, tags):
        self.run = FakeRun(tags)


class FakeClient:
    """PipesK8sClient's `run`, recorded; the invocation answers the job's custom messages."""

    def run(self, **kwargs):
        self.kwargs = kwargs

        class Invocation:
            def get_custom_messages(self):
                return [{"adapter": "/opt/safevid/data/runs/x/adapter"}]

        return Invocation()


def test_training_runs_through_pipes_in_the_runs_image():
    client = FakeClient()
    extras = {"method": "dpo", "spec": "/opt/safevid/data/runs/x/spec.json"}
    messages = k8s.run_training_in_k8s(FakeContext({"dagster/image": "registry.example.com/safevid-pipeline:0.1.0"}), COMMAND, extras, gpus=2, client=client)
    assert messages == [{"adapter": "/opt/safevid/data/runs/x/adapter"}]
    sent = client.kwargs
    assert sent["image"] == "registry.example.com/safevid-pipeline:0.1.0" and sent["command"] == COMMAND and sent["extras"] == extras
    assert sent["base_pod_spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert built_pod(sent["base_pod_spec"]).spec.containers[0].image == sent["image"]


def test_training_without_an_image_says_why(monkeypatch):
    monkeypatch.delenv("DAGSTER_CURRENT_IMAGE", raising=False)
    with pytest.raises(ValueError, match="no image for the training pod"):
        k8s.run_training_in_k8s(FakeContext({}), COMMAND, {}, client=FakeClient())


def test_the_real_pipes_client_takes_these_arguments():
    import inspect

    from dagster_k8s import PipesK8sClient

    params = inspect.signature(PipesK8sClient.run).parameters
    assert {"context", "image", "command", "extras", "namespace", "base_pod_meta", "base_pod_spec"} <= set(params)


# ---- the cluster's own objects (cluster.yaml), names and image ----

def cluster_docs():
    return [d for d in yaml.safe_load_all((DEPLOY / "cluster.yaml").read_text()) if d]


def test_the_cluster_objects_are_valid_and_named_as_the_rest():
    docs = cluster_docs()
    assert k8s.cluster_problems(docs) == []
    by_kind = {d["kind"]: d for d in docs}
    assert by_kind["ConfigMap"]["metadata"]["name"] == k8s.ENV_CONFIG_MAP
    assert by_kind["PersistentVolumeClaim"]["metadata"]["name"] == k8s.DATA_PVC
    assert by_kind["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    launcher = load("dagster.yaml")["run_launcher"]["config"]
    assert by_kind["RoleBinding"]["subjects"][0] == {"kind": "ServiceAccount", "name": launcher["service_account_name"], "namespace": launcher["job_namespace"]}
    assert launcher["job_namespace"] == k8s.NAMESPACE
    assert launcher["env_config_maps"] == [k8s.ENV_CONFIG_MAP] and launcher["env_secrets"] == [k8s.SECRET]
    assert launcher["volumes"][0]["persistentVolumeClaim"]["claimName"] == k8s.DATA_PVC
    assert launcher["volume_mounts"][0]["mountPath"] == k8s.DATA_MOUNT
    deployment = load("values.yaml")["dagster-user-deployments"]["deployments"][0]
    assert deployment["volumes"] == launcher["volumes"] and deployment["volumeMounts"] == launcher["volume_mounts"]


def test_broken_cluster_objects_are_refused():
    docs = cluster_docs()
    docs[0]["dta"] = docs[0].pop("data")
    assert any("Unexpected keys in model class V1ConfigMap" in p for p in k8s.cluster_problems(docs))
    docs = cluster_docs()
    docs[0]["data"]["OPENAI_API_KEY"] = "sk-123"
    assert any("literal secret at ConfigMap.data.OPENAI_API_KEY" in p for p in k8s.cluster_problems(docs))


def test_literal_secrets_tell_a_secret_from_a_reference_to_one():
    refs = {"postgres_password_secret": "dagster-postgresql-secret", "postgresqlSecretName": "x", "envSecrets": [{"name": "s"}],
            "password": {"env": "DAGSTER_PG_PASSWORD"}, "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "HF_TOKEN"}}}]}
    assert k8s.literal_secrets(refs) == []
    assert k8s.literal_secrets({"a": {"api_key": "sk-1"}, "env": [{"name": "HF_TOKEN", "value": "hf_1"}]}) == ["a.api_key", "env[0].value"]


def test_the_image_installs_the_lock_and_the_matching_postgres_storage():
    import dagster_k8s

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "pip install --require-hashes -r requirements.lock" in dockerfile
    # dagster-postgres moves with dagster-k8s (both libraries of one dagster release).
    assert re.search(r"dagster-postgres==(\S+)", dockerfile)[1] == dagster_k8s.__version__
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.M)[1]
    assert k8s.DATA_MOUNT == f"{workdir}/data"  # ground.settings' data_dir, under PROJECT_ROOT in the image
    args = load("values.yaml")["dagster-user-deployments"]["deployments"][0]["dagsterApiGrpcArgs"]
    assert args[args.index("--working-directory") + 1] == workdir


def test_everything_in_deploy_is_fit_and_the_module_imports_cheaply():
    assert k8s.deploy_problems() == []
    out = subprocess.run([sys.executable, "-c", "import sys, resources.k8s; print(sorted({'dagster', 'dagster_k8s', 'kubernetes'} & set(sys.modules)))"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
