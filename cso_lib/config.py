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
    incremental: bool = Field(
        False,
        description="Only trajectories committed to `trajectories` since the last successful run (the Delta version "
        "its select recorded in `runs`; read with Change Data Feed). A rerun of a run id reuses its recorded range.",
    )


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
    batch: bool = Field(
        False,
        description="Offline stages (PRM, expert, judge) send the requests the ledger lacks through the provider's "
        "batch API (OpenAI Batch, Anthropic Message Batches: half price, answers within 24 h), submitted from the "
        "driver; batch ids are kept in the `llm_batches` table, so a rerun resumes polling instead of resubmitting.",
    )
    batch_max_requests: int = Field(10_000, ge=1, le=50_000, description="Requests per submitted batch at most.")
    batch_poll_s: float = Field(60.0, gt=0, description="Seconds between polls of a submitted batch.")
    batch_wait_s: float = Field(
        86_400.0, gt=0, description="Wait at most this long for batches in one job; a rerun resumes polling them."
    )
    batch_resubmits: int = Field(
        1, ge=0, le=5, description="Times an expired or failed batch request is submitted again before it is "
        "recorded as an error."
    )

    @model_validator(mode="after")
    def _batch_provider(self) -> ModelConfig:
        if self.batch and self.provider not in ("openai", "anthropic"):
            raise ValueError(f"batch=true needs provider 'openai' or 'anthropic', got provider={self.provider!r}")
        return self


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
    original_rollouts: int = Field(
        0, ge=0,
        description="Re-rollouts of the policy's ORIGINAL action a_t per candidate step (stored with alt_idx = -1), so "
        "the flip (success rate of the alternative minus that of the original) is measured, not assumed. 0: off.",
    )
    verifier: Literal["rules", "judge", "rules_or_judge"] = Field(
        "rules",
        description="How a branch's final answer is checked: rules (normalised exact match, numeric tolerance, "
        "list/set), judge (the LLM judge `verifier_model`, GAIA-style), or rules_or_judge (the judge decides only "
        "answers the rules reject).",
    )
    verify: bool = Field(True, description="False: pairs straight from candidates (the 'w/o verification' ablation).")
    use_prm: bool = Field(
        True,
        description="False: the paper's 'w/o PRM' ablation: the thresholds are ignored, every step with an alternative "
        "is a candidate and every alternative is rolled out, so verification alone decides (use with order=paper).",
    )

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
    record_calls: bool = Field(
        False,
        description="Record the simulated expert's, PRM's and judge's requests in `llm_calls` as provider-backed "
        "roles do: the real prompt's hash, tokens estimated as characters / 4, cost 0 (bench/call_savings.py). "
        "Off by default: the simulation then writes no ledger rows.",
    )


class HousekeepingConfig(_Section):
    tables: list[str] | None = Field(None, description="Tables to maintain (None: every table of the warehouse).")
    optimize: bool = Field(True, description="OPTIMIZE (compact small files), Z-ordered where `zorder` says.")
    zorder: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "trajectories": ["policy_version", "env"],
            "steps": ["trajectory_id"],
            "work_set": ["run_id"],
            "prm_scores": ["trajectory_id", "step_idx"],
            "expert_alternatives": ["trajectory_id", "step_idx"],
            "critical_candidates": ["trajectory_id", "step_idx"],
            "branch_rollouts": ["trajectory_id", "step_idx"],
            "critical_steps": ["policy_version", "error_category"],
            "llm_calls": ["request_hash"],
        },
        description="Z-order columns per table: the columns analysts and the stages filter and join on.",
    )
    vacuum: bool = Field(True, description="VACUUM files no longer referenced and older than the retention.")
    staging_retain_hours: float = Field(
        24.0,
        ge=0,
        description="Delete ingest staging folders (`storage.staging_dir`) left by an ingest that was killed, once "
        "older than this (a finished or failed ingest deletes its own). Keep it longer than an ingest can run.",
    )
    retain_hours: float = Field(
        168.0,
        ge=0,
        description="VACUUM retention. Keep it longer than the schedule interval: incremental runs read the "
        "change feed since the last successful run, and time travel needs the files. Below 168 h needs "
        "`allow_short_retention`.",
    )
    allow_short_retention: bool = Field(
        False, description="Permit retain_hours < 168 (turns off Delta's retention-duration check; tests)."
    )


class RolloutsConfig(_Section):
    """Where the branch-rollout stage runs: a GPU executor pool through Spark stage-level scheduling.

    With `gpus_per_task` > 0 the stage's batch function runs under a ResourceProfile asking that many GPUs per
    task (the other stages keep the default profile). With `executor_gpus` unset the profile holds task
    requests only, which Spark schedules on the application's executors with dynamic allocation off: start
    them with spark.executor.resource.gpu.amount and a discovery script (infra/gpu-discovery.sh). With
    `executor_gpus` set the profile also asks for executors of its own (a separate GPU pool): that needs
    dynamic allocation (spark.dynamicAllocation.enabled with shuffle tracking, YARN or Kubernetes).
    """

    gpus_per_task: float = Field(0, ge=0, description="GPUs per rollout task (0: no resource profile).")
    cpus_per_task: int = Field(1, ge=1, description="CPU cores per rollout task under the profile.")
    executor_gpus: int | None = Field(
        None, ge=1, description="GPUs per executor of a separate rollout pool (needs dynamic allocation); None: "
        "task requests only, on the application's executors."
    )
    executor_cores: int | None = Field(None, ge=1, description="Cores per executor of the separate pool.")
    executor_memory: str | None = Field(None, description="Heap of an executor of the separate pool, e.g. '16g'.")
    gpu_discovery_script: str | None = Field(
        None, description="Discovery script of the separate pool's GPUs (e.g. infra/gpu-discovery.sh)."
    )
    web_site_seed: int = Field(0, description="Seed of the local web site that `web` trajectories browse.")
    tool_threads: int = Field(8, ge=1, description="Tool calls of different branches run at once per task.")

    @model_validator(mode="after")
    def _pool(self) -> RolloutsConfig:
        if self.executor_gpus is not None and not self.gpus_per_task:
            raise ValueError(f"rollouts.executor_gpus={self.executor_gpus!r} needs rollouts.gpus_per_task > 0")
        return self


class TrainConfig(_Section):
    """The DPO job (`cso train`, jobs/train_dpo.py): TRL's DPOTrainer on dpo_pairs/round=<round>."""

    beta: float = Field(0.5, gt=0, description="DPO beta (paper: 0.5).")
    model: str | None = Field(
        None, description="Policy to train: a local model folder or hub id (the previous round's policy). Required."
    )
    ref_model: str | None = Field(
        None, description="Reference model; None: `model` itself, i.e. the previous round's policy (the paper's rule)."
    )
    pairs: list[str] = Field(
        default_factory=list,
        description="Parquet files or globs of pairs; empty: <storage.pairs_path>/round=<round>/*.parquet.",
    )
    output_dir: str | None = Field(None, description="Where the trained policy goes (default <warehouse>/_models/round=<round>).")
    lora: bool = Field(False, description="LoRA (peft) instead of full fine-tuning; the adapter is merged on save.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    lora_target_modules: list[str] | str = Field("all-linear", description="Modules LoRA adapts (peft syntax).")
    learning_rate: float = Field(1e-6, gt=0, description="Peak learning rate (full fine-tuning; LoRA wants ~1e-5).")
    epochs: float = Field(1.0, gt=0, description="Passes over the pairs (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; None: from epochs.")
    batch_size: int = Field(4, ge=1, description="Pairs per device per micro-batch.")
    grad_accum: int = Field(4, ge=1, description="Gradient accumulation steps.")
    max_length: int = Field(4096, ge=16, description="Tokens of prompt + completion; longer pairs are truncated.")
    max_truncated_share: float = Field(
        0.05, ge=0, le=1, description="Refuse to train when more than this share of the pairs exceeds max_length."
    )
    report_to: Literal["none", "tensorboard", "mlflow"] = Field(
        "tensorboard", description="Tracker for the metrics (they always go to the console and train_metrics.json)."
    )
    logging_steps: int = Field(10, ge=1, description="Log metrics every this many optimizer steps.")
    save_steps: int | None = Field(None, ge=1, description="Checkpoint every this many steps; None: only the final model.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    bf16: bool | None = Field(None, description="bf16 mixed precision; None: on when the GPU supports it.")
    seed: int = Field(42, description="Seed of data order, dropout and LoRA init.")


class EvalConfig(_Section):
    """The evaluation job (`cso evaluate`): the policy's success rate on held-out simulation tasks."""

    n_tasks: int = Field(100, ge=1, description="Held-out tasks evaluated.")
    offset: int | None = Field(
        None, ge=0, description="Index of the first held-out task; None: sim.n_tasks (after the tasks that are mined)."
    )
    max_steps: int = Field(16, ge=1, description="Policy steps per episode at most.")
    policy_version: str | None = Field(
        None, description="Version name recorded in policy_evals; None: sim.policy_version for the simulated "
        "policy, the model folder's name otherwise."
    )


class IterateConfig(_Section):
    """`cso iterate`: rounds of evaluate -> mine failures -> train -> register, each round's policy the next's
    policy and reference."""

    rounds: int = Field(2, ge=1, description="Rounds to run.")
    initial_model: str | None = Field(
        None, description="Policy of round 0 (a model folder); None: the tiny local model (cso_lib.tiny_model)."
    )
    mine_tasks: int = Field(200, ge=1, description="Simulation tasks the policy runs per round; failures are mined.")
    models_dir: str | None = Field(None, description="Where each round's trained policy goes (default <warehouse>/_models).")


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
    judge: ModelConfig | None = Field(
        None, description="The error-taxonomy judge (`cso taxonomy`); None: the PRM's model (`prm`)."
    )
    verifier_model: ModelConfig | None = Field(
        None, description="The LLM judge of branch answers (`cso.verifier` judge or rules_or_judge); an HTTP provider."
    )
    cso: CSOConfig = Field(default_factory=CSOConfig)
    rollouts: RolloutsConfig = Field(default_factory=RolloutsConfig)
    sim: SimConfig = Field(default_factory=SimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    iterate: IterateConfig = Field(default_factory=IterateConfig)
    housekeeping: HousekeepingConfig = Field(default_factory=HousekeepingConfig)
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
