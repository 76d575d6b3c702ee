import pytest
import yaml

from dagster_project.settings import DEFAULT_CONFIG, SettingsError, load_settings, parse_settings


def test_every_profile_in_pipelines_yaml_validates():
    doc = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for profile in doc:
        assert load_settings(DEFAULT_CONFIG, profile).profile == profile


def test_unknown_key_names_key_value_and_allowed():
    with pytest.raises(SettingsError) as err:
        parse_settings({"curation": {"max_duraton_s": 5}}, "embedded")
    msg = str(err.value)
    assert "curation.max_duraton_s" in msg and "5" in msg and "max_duration_s" in msg


def test_bad_choice_lists_allowed_values():
    with pytest.raises(SettingsError) as err:
        parse_settings({"judge": "gpt"}, "embedded")
    assert "'judge'" in str(err.value) and "'gpt'" in str(err.value) and "openai" in str(err.value)


def test_bad_range_is_named():
    with pytest.raises(SettingsError, match="min_duration_s"):
        parse_settings({"curation": {"min_duration_s": 9, "max_duration_s": 3}}, "embedded")


def test_missing_profile(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("embedded: {}\n")
    with pytest.raises(SettingsError, match="profile 'paper' not found"):
        load_settings(path, "paper")
