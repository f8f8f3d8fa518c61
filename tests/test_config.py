"""Configuration: paper defaults, YAML + overrides, clear errors. Pure Python."""

import pytest

from cso_lib.config import load_config
from cso_lib.errors import ConfigError


def test_paper_defaults():
    cfg = load_config(None)
    assert (cfg.cso.gamma_low, cfg.cso.gamma_high, cfg.cso.k, cfg.train.beta) == (0.45, 0.65, 5, 0.5)
    assert cfg.spark.master == "local[2]" and cfg.policy.provider == "sim" and cfg.cso.order == "prm_first"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cso:\n  k: 3\n  gamma_low: 0.3\nstorage:\n  warehouse: /data/wh\n")
    cfg = load_config(path, ["cso.k=7", "select.policy_version=v2"])
    assert cfg.cso.k == 7 and cfg.cso.gamma_low == 0.3 and cfg.storage.warehouse == "/data/wh"
    assert cfg.select.policy_version == "v2"
    assert cfg.storage.table("steps") == "/data/wh/steps" and cfg.storage.pairs_path == "/data/wh/dpo_pairs"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("cso.gamma_low=0.9", "gamma_low"),
        ("cso.k=0", "k"),
        ("cso.order=random", "order"),
        ("cso.nonsense=1", "nonsense"),
        ("novalue", "section.key=value"),
        ("select.sample_fraction=0", "sample_fraction"),
    ],
)
def test_invalid_settings_name_the_field(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])


def test_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["storage.warehouse=rel/wh", "storage.pairs_dir=out/pairs"])
    assert cfg.storage.warehouse == str(tmp_path / "rel" / "wh") and cfg.storage.pairs_path == str(tmp_path / "out" / "pairs")
    assert cfg.journal_path == str(tmp_path / "rel" / "wh" / "_llm_journal")
    assert load_config(None, ["storage.warehouse=s3a://bucket/wh"]).storage.table("steps") == "s3a://bucket/wh/steps"


def test_local_sessions_list_files_in_few_tasks_clusters_keep_sparks_default():
    from cso_lib.spark import base_conf

    key = "spark.sql.sources.parallelPartitionDiscovery.parallelism"
    local = base_conf(load_config(None, ["spark.master=local[2]", "spark.shuffle_partitions=3"]))
    assert local[key] == "3"
    assert key not in base_conf(load_config(None, ["spark.master=spark://127.0.0.1:7077"]))
    overridden = load_config(None, ["spark.master=local[2]"])
    overridden.spark.conf[key] = "64"
    assert base_conf(overridden)[key] == "64"
