import copy

import pytest
import yaml

from assets.taxonomy import TAXONOMY_DIR
from ground.taxonomy import TaxonomyError, load_taxonomy, parse_taxonomy


def _doc():
    return yaml.safe_load((TAXONOMY_DIR / "safevid-v1.yaml").read_text())


def test_shipped_taxonomies_parse():
    for path in TAXONOMY_DIR.glob("*.yaml"):
        version, subs = load_taxonomy(path)
        assert version == path.stem
        assert {s.principle for s in subs} == {"helpful", "honest", "harmless"}
        assert any(s.harmful for s in subs) and any(not s.harmful for s in subs)


def test_missing_guidance_names_file_and_path():
    doc = copy.deepcopy(_doc())
    del doc["principles"]["harmless"]["categories"]["violence"]["subcategories"]["weapons"]["safe_answer_guidance"]
    with pytest.raises(TaxonomyError) as err:
        parse_taxonomy(doc, "tax.yaml")
    assert "tax.yaml" in str(err.value)
    assert "principles.harmless.categories.violence.subcategories.weapons.safe_answer_guidance" in str(err.value)


def test_unknown_principle_and_kind():
    doc = copy.deepcopy(_doc())
    doc["principles"]["harmful"] = doc["principles"].pop("harmless")
    with pytest.raises(TaxonomyError, match="principles.harmful: unknown principle"):
        parse_taxonomy(doc, "t.yaml")
    doc = copy.deepcopy(_doc())
    doc["principles"]["honest"]["categories"]["deception"]["subcategories"]["fraud"]["kind"] = "evil"
    with pytest.raises(TaxonomyError, match="fraud.kind: 'evil'"):
        parse_taxonomy(doc, "t.yaml")


def test_file_name_must_match_version(tmp_path):
    path = tmp_path / "other.yaml"
    path.write_text((TAXONOMY_DIR / "safevid-v1.yaml").read_text())
    with pytest.raises(TaxonomyError, match="must match the file name"):
        load_taxonomy(path)
