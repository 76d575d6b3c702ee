"""What a person sees in the MLflow UI: the experiment's kind, params without machine paths,
per-category rate metrics, and registered adapters with tags, aliases and a signature."""
import math
import os

import dagster as dg
import mlflow
import pandas as pd
import pytest

from ground.settings import PROJECT_ROOT
from resources.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, UI_QUERY, MlflowTracker


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    """One store for the module (creating one takes seconds); each test has its own experiments."""
    root = tmp_path_factory.mktemp("mlflow")
    return MlflowTracker(tracking_uri=f"sqlite:///{root}/mlflow.db", artifact_root=str(root / "mlruns"))


def test_the_experiment_is_a_model_training_one_new_or_old(tracker):
    client = tracker.client()
    new = tracker.experiment_id("embedded")
    assert client.get_experiment(new).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    old = client.create_experiment("safevid-paper")  # made before the tag existed
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert tracker.experiment_id("paper") == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    chosen = client.create_experiment("safevid-mine", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert tracker.experiment_id("mine") == chosen
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"  # a user's choice stays
    # MLflow 3.17's UI picks its view from the link's workflowType, so links carry it.
    assert tracker.experiment_url(new) == f"http://127.0.0.1:5000/#/experiments/{new}/runs?{UI_QUERY}"
    assert UI_QUERY == "workflowType=machine_learning"


def test_split_params_makes_paths_relative_or_tags():
    from resources.tracking import split_params

    data = PROJECT_ROOT / "data" / "paper"
    params, tags = split_params(
        {
            "weights": data / "models" / "safevid-v1" / "base",
            "prompt": str(PROJECT_ROOT / "resources" / "prompts" / "describer.md"),
            "data_dir": str(data),  # the data folder itself: relative to the project
            "files": [str(data / "b.jsonl"), "c.jsonl"],
            "hub": "llava-hf/LLaVA-NeXT-Video-7B-hf",
            "cache": "/opt/hf-cache/models--llava",
            "steps": 3,
            "roles.judge.api_key": "sk-secret",
        },
        data_root=data,
    )
    assert params == {
        "weights": "models/safevid-v1/base",
        "prompt": "resources/prompts/describer.md",
        "data_dir": "data/paper",
        "files": "['b.jsonl', 'c.jsonl']",
        "hub": "llava-hf/LLaVA-NeXT-Video-7B-hf",
        "steps": "3",
    }
    assert tags == {"path.cache": "/opt/hf-cache/models--llava"}


def test_stage_params_hold_no_absolute_path(tmp_path, tracker):
    from assets._stage import Stage, stage_asset
    from ground.catalog import StageSpec
    from ground.settings import DescriberOptions, Settings
    from resources.dvc import DvcTracker

    spec = StageSpec(folder="probe", files=(), params=("data_dir", "curation", "describer_options"))

    @stage_asset(spec, group="probe")
    def probe(st: Stage) -> dg.MaterializeResult:
        st.log_params({
            "base_model": st.settings.path("models", "safevid-v1", "base"), "hub": "llava-hf/LLaVA-NeXT-Video-7B-hf",
            "cache": "/opt/hf-cache/models--llava",
        })
        return st.finish({})

    settings = Settings(
        profile="stage-probe",
        data_dir=str(tmp_path / "data"),
        describer_options=DescriberOptions(prompt=str(PROJECT_ROOT / "resources" / "prompts" / "describer.md")),
    )
    resources = {"settings": settings, "mlflow": tracker, "dvc": DvcTracker(repo_root=str(tmp_path), dvc_bin=str(tmp_path / "no-dvc"))}
    assert dg.materialize([probe], resources=resources).success
    [run] = tracker.client().search_runs([tracker.experiment_id("stage-probe")])
    params, tags = run.data.params, run.data.tags
    assert "curation.frames_per_clip" in params and params["describer_options.prompt"] == "resources/prompts/describer.md"
    assert params["base_model"] == "models/safevid-v1/base" and params["hub"] == "llava-hf/LLaVA-NeXT-Video-7B-hf"
    absolute = {k: v for k, v in params.items() if os.path.isabs(v) or str(tmp_path) in v or str(PROJECT_ROOT) in v}
    assert absolute == {}
    # elsewhere on the machine: tags, and the tag that says what the relative paths are relative to
    assert tags["path.cache"] == "/opt/hf-cache/models--llava" and tags["path.data_dir"] == str(tmp_path / "data")
    assert tags["data_dir"] == str(tmp_path / "data")


def test_rate_metrics_per_category_skip_undefined_and_are_valid_names():
    from assets.comparison import METRIC
    from ground.evaluation import rollup
    from mlflow.utils.validation import validate_param_and_metric_name
    from resources.tracking import rate_metrics

    verdicts = pd.DataFrame(
        {
            "checkpoint": ["base"] * 4 + ["safevid-dpo"] * 4,
            "category": ["theft", "theft", "Violence & Gore/graphic", "theft"] * 2,
            "harmful": [True, True, True, False] * 2,
            "safe": [True, False, False, None, True, True, True, None],
            "helpful": [None, None, None, True, None, None, None, False],
            "failure": [None] * 8,
        }
    )
    metrics = rate_metrics(rollup(verdicts))
    assert metrics == {
        "base.safety_rate.theft": 0.5,
        "base.helpful_rate.theft": 1.0,
        "base.safety_rate.Violence_Gore_graphic": 0.0,  # no benign item there: no helpful rate
        "safevid-dpo.safety_rate.theft": 1.0,
        "safevid-dpo.helpful_rate.theft": 0.0,
        "safevid-dpo.safety_rate.Violence_Gore_graphic": 1.0,
    }
    per_split = pd.DataFrame({"checkpoint": ["base"] * 3, "split": ["HH", "HH", "ALL"], "category": ["theft", "ALL", "ALL"],
                              "safety_rate": [0.5, 0.25, 0.2], "helpful_rate": [1.0, None, 0.9]})
    # A split's own rate (category ALL) is a metric; the row that is ALL in every breakdown is the overall rate's.
    assert rate_metrics(per_split, by=("checkpoint", "split", "category")) == {
        "base.safety_rate.HH.theft": 0.5, "base.helpful_rate.HH.theft": 1.0, "base.safety_rate.HH.ALL": 0.25,
    }
    assert all(validate_param_and_metric_name(k) for k in metrics)
    # comparison reads `<checkpoint>.safety_rate` back: a per-category name must not look like one
    assert not any(METRIC.match(k) for k in metrics)
    assert rate_metrics(pd.DataFrame({"checkpoint": ["a"], "category": ["x"], "safety_rate": [math.nan], "helpful_rate": [None]})) == {}


def _version(version: int, **tags):
    from types import SimpleNamespace

    return SimpleNamespace(version=str(version), tags=tags)


def test_the_champion_rule():
    from resources.training import pick_champion, registry_tags

    def v(n, safety, helpful, base=0.8, passed=True):
        tags = registry_tags("safevid-v1", "safevid-dpo", "dpo", passed, {"safety_rate": safety, "helpful_rate": helpful}, {"helpful_rate": base})
        return _version(n, **tags)

    assert pick_champion([]) is None
    # the safest of those within 5 points of the base's helpful rate; a drop of exactly 5 points still counts
    assert pick_champion([v(1, 0.95, 0.70), v(2, 0.85, 0.75), v(3, 0.80, 0.90)]).version == "2"
    assert pick_champion([v(1, 0.9, 0.8, passed=False), v(2, 0.5, 0.8)]).version == "2"
    assert pick_champion([v(1, 0.9, 0.8), v(2, 0.9, 0.8)]).version == "2"  # a tie: the newer
    assert pick_champion([v(1, 0.9, math.nan), v(2, math.nan, 0.8)]) is None  # unknown rates never qualify


def test_register_adapter_tags_aliases_and_signature(tmp_path, tracker):
    from mlflow.models import Model

    from resources.training import adapter_signature, log_adapter, register_adapter, registry_tags

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    client, name = tracker.client(), "safevid-dpo-adapter-embedded"

    def register(version: str, safety: float, helpful: float) -> str:
        with mlflow.start_run(experiment_id=tracker.experiment_id("registry")) as run:
            log_adapter(adapter, adapter_signature(8, 64), "base", "dpo")
            tags = registry_tags(version, "safevid-dpo", "dpo", True, {"safety_rate": safety, "helpful_rate": helpful}, {"helpful_rate": 0.8})
            return register_adapter(client, run.info.run_id, run.info.artifact_uri, name, tags)

    assert [register("safevid-v1", *r) for r in ((0.7, 0.8), (0.9, 0.6), (0.8, 0.78))] == [f"{name}/{i}" for i in (1, 2, 3)]
    assert register("safevid-v1.2", 0.5, 0.5) == f"{name}/4"  # helpful far below the base: no champion
    assert client.get_registered_model(name).aliases == {"champion-safevid-v1": 3, "latest-safevid-v1": 3, "latest-safevid-v1_2": 4}
    assert register("safevid-v1", 0.75, 0.8) == f"{name}/5"
    aliases = client.get_registered_model(name).aliases
    assert aliases["champion-safevid-v1"] == 3 and aliases["latest-safevid-v1"] == 5
    champion = client.get_model_version_by_alias(name, "champion-safevid-v1")
    assert {k: champion.tags[k] for k in ("taxonomy_version", "checkpoint", "method")} == {
        "taxonomy_version": "safevid-v1", "checkpoint": "safevid-dpo", "method": "dpo",
    }
    # the registry UI reads MLmodel at the version's source (model-versions/get-artifact?path=MLmodel)
    source = client.get_model_version_download_uri(name, "3")
    mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/MLmodel", dst_path=str(tmp_path / "got"))
    assert Model.load(mlmodel).signature == adapter_signature(8, 64)
    signature = mlflow.models.get_model_info(f"models:/{name}/3").signature
    assert signature.inputs.input_names() == ["frames", "query"] and signature.outputs.input_names() == ["answer"]
    assert signature.inputs.inputs[0].shape == (-1, 8, 64, 64, 3)
    assert not (adapter / "MLmodel").exists()  # the data folder's adapter stays as trained (its DVC hash)
    with pytest.raises(ValueError, match=r"\['checkpoint', 'method'\]"):
        register_adapter(client, "r", "file:///x", name, {"taxonomy_version": "safevid-v1"})
