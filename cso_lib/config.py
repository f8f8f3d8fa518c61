"""One typed configuration for every job, loaded from YAML with dotted command-line overrides.

The embedded default runs everything on local Spark with a Delta warehouse under the working directory and
the simulation world as the models and the environment, so `cso run` works with no file and no keys.

>>> cfg = load_config(None, ["cso.gamma_low=0.4", "spark.master=local[1]"])
>>> (cfg.cso.gamma_low, cfg.cso.gamma_high, cfg.cso.k, cfg.train.beta, cfg.spark.master)
(0.4, 0.65, 5, 0.5, 'local[1]')
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cso_lib.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SparkConfig(_Section):
    master: str | None = Field(
        "local[2]",
        description="Spark master URL. None leaves it to spark-submit (cluster runs); local[2] is the laptop default.",
    )
    app_name: str = Field("cso", description="Spark application name; each stage appends its own name.")
    shuffle_partitions: int = Field(4, ge=1, description="spark.sql.shuffle.partitions.")
    delta_jars_dir: str | None = Field(
        None,
        description="Folder holding the Delta jars fetched at setup (default: <checkout>/.cache/jars). When "
        "absent, Spark resolves io.delta:delta-spark_2.13 from Maven into .cache/ivy instead.",
    )
    conf: dict[str, str] = Field(default_factory=dict, description="Extra Spark settings, passed through.")


class StorageConfig(_Section):
    warehouse: str = Field("cso_warehouse", description="Root folder (or URI) of the Delta tables.")
    pairs_dir: str | None = Field(None, description="Parquet output of DPO pairs (default <warehouse>/dpo_pairs).")
    staging_dir: str | None = Field(None, description="Scratch space for ingestion (default <warehouse>/_staging).")

    @model_validator(mode="after")
    def _absolute(self) -> StorageConfig:
        """Local paths become absolute (Delta wants them so, and executors must not depend on a cwd)."""
        for name in ("warehouse", "pairs_dir", "staging_dir"):
            value = getattr(self, name)
            if value and "://" not in value and not os.path.isabs(value):
                object.__setattr__(self, name, os.path.abspath(value))
        return self

    def table(self, name: str) -> str:
        return f"{self.warehouse.rstrip('/')}/{name}"

    @property
    def pairs_path(self) -> str:
        return self.pairs_dir or self.table("dpo_pairs")

    @property
    def staging_path(self) -> str:
        return self.staging_dir or self.table("_staging")


class IngestConfig(_Section):
    paths: list[str] = Field(
        default_factory=list,
        description="Files or folders of raw logs (JSONL, or JSON arrays). Empty on the embedded default: the "
        "simulation's logs are used.",
    )
    source_table: str | None = Field(
        None, description="A Delta table of raw logs instead of files: one JSON record per row in `raw_column`."
    )
    raw_column: str = Field("raw", description="Column of `source_table` holding the JSON record.")
    id_column: str | None = Field(None, description="Column of `source_table` naming each record in quarantine.")
    default_env: str = Field("unknown", description="Environment name for records that carry none.")
    max_record_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Records larger than this are quarantined.")
    split_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Bytes of JSONL per ingestion task.")


class SelectConfig(_Section):
    outcome: int = Field(0, description="Outcome of the trajectories to mine (0 = failed).")
    round: int | None = Field(None, description="Only trajectories of this round (None: all).")
    policy_version: str | None = Field(None, description="Only trajectories of this policy version (None: all).")
    env: str | None = Field(None, description="Only trajectories of this environment (None: all).")
    sample_fraction: float = Field(1.0, gt=0, le=1, description="Seeded sample of the selected trajectories.")
    seed: int = Field(0, description="Seed of the sample.")
    limit: int | None = Field(None, ge=1, description="At most this many trajectories (lowest ids first).")


class ModelConfig(_Section):
    provider: Literal["sim", "openai", "anthropic", "vllm", "transformers"] = Field(
        "sim", description="Backend. `sim` is the simulation world's scripted model (tests, dry runs)."
    )
    model: str = Field("sim", description="Model name at the provider.")
    params: dict[str, Any] = Field(default_factory=dict, description="Sampling parameters.")
    base_url: str | None = Field(None, description="Endpoint of an HTTP provider, e.g. http://127.0.0.1:8000/v1.")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the API key (the key itself never goes in config)."
    )
    requests_per_minute: float | None = Field(None, gt=0, description="Job-wide request budget for this model.")
    input_tokens_per_minute: float | None = Field(None, gt=0, description="Job-wide input-token budget.")
    output_tokens_per_minute: float | None = Field(None, gt=0, description="Job-wide output-token budget.")
    max_attempts: int = Field(5, ge=1, le=20, description="Sends per request at most (retries are bounded).")
    timeout_s: float = Field(120.0, gt=0, description="Timeout of one HTTP call.")
    deadline_s: float = Field(900.0, gt=0, description="Give up on a request (all attempts) after this long.")
    concurrency: int = Field(16, ge=1, description="Requests in flight per Spark task.")
    parse_retries: int = Field(2, ge=0, description="New samples asked when a judge answer does not parse.")


class CSOConfig(_Section):
    gamma_low: float = Field(0.45, ge=0, le=1, description="A step is a candidate only if r_policy < gamma_low.")
    gamma_high: float = Field(0.65, ge=0, le=1, description="... and max_j r_expert_j > gamma_high.")
    k: int = Field(5, ge=1, le=32, description="Alternatives proposed by the expert per step.")
    order: Literal["prm_first", "paper"] = Field(
        "prm_first",
        description="prm_first: ask the expert only where r_policy < gamma_low (no other step can qualify); "
        "paper: alternatives at every step, as in the paper. Same candidates, fewer calls.",
    )
    max_steps_after_branch: int = Field(
        12, ge=1, description="Policy steps allowed after the branch point (counted from it, not from step 0)."
    )
    rollouts_per_alternative: int = Field(1, ge=1, description="Branch rollouts per high-scoring alternative.")
    verify: bool = Field(True, description="False: pairs straight from candidates (the 'w/o verification' ablation).")

    @model_validator(mode="after")
    def _thresholds(self) -> CSOConfig:
        if self.gamma_low > self.gamma_high:
            raise ValueError(f"gamma_low={self.gamma_low!r} must not exceed gamma_high={self.gamma_high!r}")
        return self


class SimConfig(_Section):
    seed: int = Field(7, description="Seed of the world (knowledge base, tasks) and of the scripted models.")
    n_tasks: int = Field(500, ge=1, description="Tasks generated; one logged trajectory each.")
    n_entities: int = Field(400, ge=20, description="Entities per type in the knowledge base.")
    min_hops: int = Field(2, ge=1, description="Fewest lookups a task needs after the search.")
    max_hops: int = Field(4, ge=1, description="Most lookups a task needs after the search.")
    policy_error_rate: float = Field(0.2, ge=0, le=1, description="Chance the policy errs at a decision point.")
    policy_slip_rate: float = Field(
        0.05, ge=0, le=1, description="Chance of a harmless malformed tool call (retried at the next step)."
    )
    expert_quality: float = Field(0.7, ge=0, le=1, description="Chance the expert's k alternatives include the fix.")
    prm_noise: float = Field(0.12, ge=0, le=1, description="Std-dev of the simulated PRM's Gaussian score noise.")
    logs_dir: str | None = Field(None, description="Where `cso simulate` writes logs (default <warehouse>/../sim_logs).")
    policy_version: str = Field("sim-policy-v0", description="Policy version written into the simulated logs.")


class TrainConfig(_Section):
    beta: float = Field(0.5, gt=0, description="DPO beta (paper: 0.5).")


class Config(_Section):
    run_id: str | None = Field(
        None,
        description="Run to work on. `select` starts a new one when None; later stages default to the latest "
        "selected run. Pass the same id to resume a run.",
    )
    round: int = Field(0, ge=0, description="CSO round; pairs land in dpo_pairs/round=<round>.")
    spark: SparkConfig = Field(default_factory=SparkConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    policy: ModelConfig = Field(default_factory=ModelConfig)
    expert: ModelConfig = Field(default_factory=ModelConfig)
    prm: ModelConfig = Field(default_factory=ModelConfig)
    cso: CSOConfig = Field(default_factory=CSOConfig)
    sim: SimConfig = Field(default_factory=SimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    prices: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="USD per million tokens per model name: {model: {input, output, cached_input, cache_write}}.",
    )
    tasks_at_once: int = Field(
        2, ge=1, description="Spark tasks calling a model at the same time; each gets 1/tasks_at_once of its budget."
    )
    journal_dir: str | None = Field(
        None,
        description="Local or shared (NFS) folder where executors make each model response durable at once "
        "(default <warehouse>/_llm_journal; must be a filesystem path, not an object-store URI).",
    )

    @property
    def journal_path(self) -> str:
        return self.journal_dir or self.storage.table("_llm_journal")

    @property
    def sim_logs_dir(self) -> str:
        return self.sim.logs_dir or str(Path(self.storage.warehouse).parent / "sim_logs")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Merge a YAML file (optional) with `key.path=value` overrides (values parsed as YAML scalars)."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config file {str(path)!r}: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(tree).__name__}")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    try:
        return Config.model_validate(tree)
    except ValueError as e:
        raise ConfigError(f"invalid configuration: {e}") from e
