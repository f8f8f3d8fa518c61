"""Schemas of every Delta table (and the Parquet pairs), as code.

Messages are kept as JSON text in OpenAI chat format (role, content, tool_calls, tool_call_id, name): a
trajectory is `preamble` (system + messages before the first assistant turn) followed, per step, by the
step's `action` (one assistant message) and its `observations` (the tool / user messages that answered
it). The state s_t the policy saw at step t is therefore preamble + steps[0..t-1], rebuilt per trajectory
inside executors; no table stores a per-step copy of the prefix.
"""

from pyspark.sql.types import (
    ArrayType,
    BooleanType,
    DoubleType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

TRAJECTORIES = StructType(
    [
        StructField("trajectory_id", StringType(), nullable=False),
        StructField("task_id", StringType(), nullable=False),
        StructField("query", StringType(), nullable=False),
        StructField("ground_truth", StringType(), nullable=True),
        StructField("outcome", IntegerType(), nullable=False),
        StructField("reward", DoubleType(), nullable=True),
        StructField("policy_model", StringType(), nullable=False),
        StructField("policy_version", StringType(), nullable=False),
        StructField("env", StringType(), nullable=False),
        StructField("round", IntegerType(), nullable=False),
        StructField("tools", StringType(), nullable=True),  # JSON list of OpenAI tool specs
        StructField("preamble", StringType(), nullable=False),  # JSON list of messages
        StructField("n_steps", IntegerType(), nullable=False),
        StructField("input_format", StringType(), nullable=False),  # native | messages | tau-bench
        StructField("content_hash", StringType(), nullable=False),
        StructField("source", StringType(), nullable=False),  # file path or table name
        StructField("locator", StringType(), nullable=False),  # where in the source (line, offset, index)
        StructField("metadata", StringType(), nullable=True),  # JSON object, passed through
        StructField("ingest_run_id", StringType(), nullable=False),
        StructField("ingested_at", TimestampType(), nullable=False),
    ]
)

STEPS = StructType(
    [
        StructField("trajectory_id", StringType(), nullable=False),
        StructField("step_idx", IntegerType(), nullable=False),
        StructField("action", StringType(), nullable=False),  # JSON: one assistant message
        StructField("observations", StringType(), nullable=False),  # JSON list of messages
        StructField("action_tool", StringType(), nullable=True),  # first tool called, for analysts
        StructField("ingest_run_id", StringType(), nullable=False),
    ]
)

QUARANTINE = StructType(
    [
        StructField("source", StringType(), nullable=False),
        StructField("locator", StringType(), nullable=False),
        StructField("record_id", StringType(), nullable=True),
        StructField("reason", StringType(), nullable=False),
        StructField("raw", StringType(), nullable=True),  # first 4 KiB of the record
        StructField("run_id", StringType(), nullable=False),
        StructField("quarantined_at", TimestampType(), nullable=False),
    ]
)

WORK_SET = StructType(
    [
        StructField("run_id", StringType(), nullable=False),
        StructField("trajectory_id", StringType(), nullable=False),
        StructField("round", IntegerType(), nullable=False),
        StructField("selected_at", TimestampType(), nullable=False),
    ]
)

# One row per PRM judgement. alt_idx = -1 is the policy's own action; >= 0 an expert alternative.
PRM_SCORES = StructType(
    [
        StructField("trajectory_id", StringType(), nullable=False),
        StructField("step_idx", IntegerType(), nullable=False),
        StructField("alt_idx", IntegerType(), nullable=False),
        StructField("prm_model", StringType(), nullable=False),
        StructField("prompt_version", StringType(), nullable=False),  # the PRM template, e.g. prm-rubric/v1
        StructField("score", DoubleType(), nullable=True),  # null = unscored (see status)
        StructField("status", StringType(), nullable=False),  # ok | unscored
        StructField("reasoning", StringType(), nullable=True),
        StructField("run_id", StringType(), nullable=False),
        StructField("created_at", TimestampType(), nullable=False),
    ]
)

EXPERT_ALTERNATIVES = StructType(
    [
        StructField("trajectory_id", StringType(), nullable=False),
        StructField("step_idx", IntegerType(), nullable=False),
        StructField("alt_idx", IntegerType(), nullable=False),
        StructField("expert_model", StringType(), nullable=False),
        StructField("prompt_version", StringType(), nullable=False),  # the expert template
        StructField("action", StringType(), nullable=False),  # JSON: one assistant message
        StructField("run_id", StringType(), nullable=False),
        StructField("created_at", TimestampType(), nullable=False),
    ]
)

# Every decision, positive or not, so an analyst can ask why a step was or was not chosen.
CRITICAL_CANDIDATES = StructType(
    [
        StructField("trajectory_id", StringType(), nullable=False),
        StructField("step_idx", IntegerType(), nullable=False),
        StructField("r_policy", DoubleType(), nullable=True),
        StructField("max_r_expert", DoubleType(), nullable=True),
        StructField("best_alt_idx", IntegerType(), nullable=True),
        StructField("high_alt_idxs", ArrayType(IntegerType(), containsNull=True), nullable=False),
        StructField("is_candidate", BooleanType(), nullable=False),
        StructField("reason", StringType(), nullable=False),
        StructField("gamma_low", DoubleType(), nullable=False),
        StructField("gamma_high", DoubleType(), nullable=False),
        StructField("k", IntegerType(), nullable=False),
        StructField("order", StringType(), nullable=False),
        StructField("run_id", StringType(), nullable=False),
        StructField("decided_at", TimestampType(), nullable=False),
    ]
)

BRANCH_ROLLOUTS = StructType(
    [
        StructField("trajectory_id", StringType(), nullable=False),
        StructField("step_idx", IntegerType(), nullable=False),
        StructField("alt_idx", IntegerType(), nullable=False),
        StructField("rollout_idx", IntegerType(), nullable=False),
        StructField("policy_model", StringType(), nullable=False),
        StructField("status", StringType(), nullable=False),  # answered | budget_exhausted | skipped | error
        StructField("skip_reason", StringType(), nullable=True),
        StructField("continuation", StringType(), nullable=False),  # JSON messages after s_t (a'_t first)
        StructField("steps_after_branch", IntegerType(), nullable=False),
        StructField("final_answer", StringType(), nullable=True),
        StructField("success", BooleanType(), nullable=True),
        StructField("verifier", StringType(), nullable=False),
        StructField("verdict", StringType(), nullable=True),
        # JSON: the Spark task's resources, e.g. {"cpus": 1, "gpu": ["0"]} under the GPU rollout profile
        StructField("task_resources", StringType(), nullable=True),
        StructField("run_id", StringType(), nullable=False),
        StructField("created_at", TimestampType(), nullable=False),
    ]
)

CRITICAL_STEPS = StructType(
    [
        StructField("trajectory_id", StringType(), nullable=False),
        StructField("step_idx", IntegerType(), nullable=False),
        StructField("alt_idx", IntegerType(), nullable=False),
        StructField("task_id", StringType(), nullable=False),
        StructField("env", StringType(), nullable=False),
        StructField("round", IntegerType(), nullable=False),
        StructField("policy_version", StringType(), nullable=False),
        StructField("n_steps", IntegerType(), nullable=False),
        StructField("r_policy", DoubleType(), nullable=True),
        StructField("r_expert", DoubleType(), nullable=True),
        StructField("verified", BooleanType(), nullable=False),
        StructField("rollouts", IntegerType(), nullable=False),
        StructField("successes", IntegerType(), nullable=False),
        # re-rollouts of the original action (cso.original_rollouts; alt_idx -1 in branch_rollouts) and the flip:
        # successes / rollouts of the alternative minus those of the original; null when not measured
        StructField("original_rollouts", IntegerType(), nullable=True),
        StructField("original_successes", IntegerType(), nullable=True),
        StructField("flip", DoubleType(), nullable=True),
        StructField("verifier", StringType(), nullable=False),
        StructField("chosen", StringType(), nullable=False),  # JSON: assistant message
        StructField("rejected", StringType(), nullable=False),  # JSON: assistant message
        StructField("prompt", StringType(), nullable=False),  # JSON: messages up to s_t
        StructField("tools", StringType(), nullable=True),
        # Error taxonomy (stage `taxonomy`, verified rows): a category of prompts.CATEGORIES, or null with
        # taxonomy_status "unclassified" (the judge's answer did not parse); all null until classified.
        StructField("error_category", StringType(), nullable=True),
        StructField("taxonomy_status", StringType(), nullable=True),  # ok | unclassified
        StructField("taxonomy_reasoning", StringType(), nullable=True),
        StructField("taxonomy_model", StringType(), nullable=True),
        StructField("taxonomy_prompt_version", StringType(), nullable=True),
        StructField("sim_true_fix", BooleanType(), nullable=True),  # simulation only: ground truth of the pair
        StructField("run_id", StringType(), nullable=False),
        StructField("created_at", TimestampType(), nullable=False),
    ]
)

RUNS = StructType(
    [
        StructField("run_id", StringType(), nullable=False),
        StructField("stage", StringType(), nullable=False),
        StructField("started_at", TimestampType(), nullable=False),
        StructField("finished_at", TimestampType(), nullable=False),
        StructField("seconds", DoubleType(), nullable=False),
        StructField("rows_in", LongType(), nullable=True),
        StructField("rows_out", LongType(), nullable=True),
        StructField("details", StringType(), nullable=True),  # JSON
    ]
)

# The request ledger, which is also the cache: one row per distinct request (hash of provider, model, params,
# messages, tools, response format). A rerun sends only requests without an `ok` row.
LLM_CALLS = StructType(
    [
        StructField("request_hash", StringType(), nullable=False),
        StructField("provider", StringType(), nullable=False),
        StructField("model", StringType(), nullable=False),
        StructField("stage", StringType(), nullable=False),
        StructField("role", StringType(), nullable=False),
        StructField("status", StringType(), nullable=False),  # ok | error
        StructField("choices", StringType(), nullable=True),  # JSON list of assistant messages
        StructField("finish_reasons", StringType(), nullable=True),
        StructField("input_tokens", LongType(), nullable=False),
        StructField("cached_input_tokens", LongType(), nullable=False),
        StructField("cache_write_tokens", LongType(), nullable=False),
        StructField("output_tokens", LongType(), nullable=False),
        StructField("cost_usd", DoubleType(), nullable=True),
        StructField("latency_s", DoubleType(), nullable=False),
        StructField("attempts", IntegerType(), nullable=False),
        StructField("http_statuses", StringType(), nullable=True),
        StructField("error", StringType(), nullable=True),
        StructField("batch", BooleanType(), nullable=False),
        StructField("run_id", StringType(), nullable=False),
        StructField("created_at", TimestampType(), nullable=False),
    ]
)

# Batch-API submissions (OpenAI Batch, Anthropic Message Batches): one row per provider batch, written the
# moment it is submitted, so a restarted job resumes polling it instead of submitting again.
LLM_BATCHES = StructType(
    [
        StructField("batch_id", StringType(), nullable=False),  # the provider's id
        StructField("provider", StringType(), nullable=False),
        StructField("model", StringType(), nullable=False),
        StructField("stage", StringType(), nullable=False),
        StructField("role", StringType(), nullable=False),
        StructField("run_id", StringType(), nullable=False),
        StructField("request_hashes", ArrayType(StringType(), containsNull=False), nullable=False),  # = custom_ids
        StructField("n_requests", IntegerType(), nullable=False),
        StructField("status", StringType(), nullable=False),  # submitted, then the provider's final word
        StructField("collected", BooleanType(), nullable=False),  # results folded into llm_calls
        StructField("n_ok", IntegerType(), nullable=True),
        StructField("n_error", IntegerType(), nullable=True),  # refused for good (e.g. HTTP 400)
        StructField("n_resubmit", IntegerType(), nullable=True),  # expired, cancelled, transient errors, missing
        StructField("submitted_at", TimestampType(), nullable=False),
        StructField("finished_at", TimestampType(), nullable=True),
    ]
)

# Parquet dpo_pairs/: TRL conversational preference records + provenance.
_FUNCTION = StructType(
    [StructField("name", StringType(), nullable=True), StructField("arguments", StringType(), nullable=True)]
)
_TOOL_CALL = StructType(
    [
        StructField("id", StringType(), nullable=True),
        StructField("type", StringType(), nullable=True),
        StructField("function", _FUNCTION, nullable=True),
    ]
)
MESSAGE = StructType(
    [
        StructField("role", StringType(), nullable=False),
        StructField("content", StringType(), nullable=True),
        StructField("tool_calls", ArrayType(_TOOL_CALL), nullable=True),
        StructField("tool_call_id", StringType(), nullable=True),
        StructField("name", StringType(), nullable=True),
    ]
)
MESSAGES = ArrayType(MESSAGE, containsNull=True)

DPO_PAIRS = StructType(
    [
        StructField("prompt", MESSAGES, nullable=False),
        StructField("chosen", MESSAGES, nullable=False),
        StructField("rejected", MESSAGES, nullable=False),
        StructField("tools", StringType(), nullable=True),
        StructField("trajectory_id", StringType(), nullable=False),
        StructField("task_id", StringType(), nullable=False),
        StructField("step_idx", IntegerType(), nullable=False),
        StructField("alt_idx", IntegerType(), nullable=False),
        StructField("r_policy", DoubleType(), nullable=True),
        StructField("r_expert", DoubleType(), nullable=True),
        StructField("verified", BooleanType(), nullable=False),
        StructField("verifier", StringType(), nullable=False),
        StructField("policy_version", StringType(), nullable=False),
        StructField("run_id", StringType(), nullable=False),
        StructField("round", IntegerType(), nullable=False),
    ]
)

# `cso evaluate`: one row per (policy version, task set): success rate with its 95% Wilson interval.
POLICY_EVALS = StructType(
    [
        StructField("policy_version", StringType(), nullable=False),
        StructField("task_set", StringType(), nullable=False),  # e.g. sim(seed=7)[500:600]
        StructField("policy_model", StringType(), nullable=False),  # the backend's name for the policy
        StructField("round", IntegerType(), nullable=False),
        StructField("n_tasks", IntegerType(), nullable=False),
        StructField("successes", IntegerType(), nullable=False),
        StructField("success_rate", DoubleType(), nullable=False),
        StructField("ci_low", DoubleType(), nullable=False),
        StructField("ci_high", DoubleType(), nullable=False),
        StructField("ci_method", StringType(), nullable=False),  # wilson-95
        StructField("answered", IntegerType(), nullable=False),
        StructField("budget_exhausted", IntegerType(), nullable=False),
        StructField("mean_steps", DoubleType(), nullable=False),
        StructField("max_steps", IntegerType(), nullable=False),
        StructField("episodes_path", StringType(), nullable=True),  # JSONL logs of the episodes (input format)
        StructField("run_id", StringType(), nullable=False),
        StructField("created_at", TimestampType(), nullable=False),
    ]
)

# `cso iterate`: the policy of each round. Round r's policy is trained from version r-1 (its reference model).
POLICY_VERSIONS = StructType(
    [
        StructField("policy_version", StringType(), nullable=False),
        StructField("round", IntegerType(), nullable=False),  # the round whose pairs trained it (-1: the initial)
        StructField("model_path", StringType(), nullable=False),
        StructField("parent_version", StringType(), nullable=True),  # policy and reference model it was trained from
        StructField("pairs", IntegerType(), nullable=False),
        StructField("train_steps", IntegerType(), nullable=False),
        StructField("train_loss", DoubleType(), nullable=True),
        StructField("first_loss", DoubleType(), nullable=True),
        StructField("last_loss", DoubleType(), nullable=True),
        StructField("last_reward_margin", DoubleType(), nullable=True),
        StructField("beta", DoubleType(), nullable=True),
        StructField("lora", BooleanType(), nullable=False),
        StructField("status", StringType(), nullable=False),  # initial | trained | unchanged (no pairs)
        StructField("details", StringType(), nullable=True),  # JSON: the training summary
        StructField("run_id", StringType(), nullable=False),
        StructField("created_at", TimestampType(), nullable=False),
    ]
)

# Natural keys: every stage MERGEs on these, which is what makes reruns add nothing.
KEYS = {
    "trajectories": ["trajectory_id"],
    "steps": ["trajectory_id", "step_idx"],
    "quarantine": ["source", "locator", "reason"],
    "work_set": ["run_id", "trajectory_id"],
    "prm_scores": ["trajectory_id", "step_idx", "alt_idx", "prm_model"],
    "expert_alternatives": ["trajectory_id", "step_idx", "alt_idx", "expert_model"],
    "critical_candidates": ["trajectory_id", "step_idx"],
    "branch_rollouts": ["trajectory_id", "step_idx", "alt_idx", "rollout_idx", "policy_model"],
    "critical_steps": ["trajectory_id", "step_idx", "alt_idx", "verified"],
    "runs": ["run_id", "stage", "started_at"],
    "llm_calls": ["request_hash"],
    "policy_evals": ["policy_version", "task_set", "policy_model"],
    "policy_versions": ["policy_version"],
    "llm_batches": ["batch_id"],
}

TABLES = {
    "trajectories": TRAJECTORIES,
    "steps": STEPS,
    "quarantine": QUARANTINE,
    "work_set": WORK_SET,
    "prm_scores": PRM_SCORES,
    "expert_alternatives": EXPERT_ALTERNATIVES,
    "critical_candidates": CRITICAL_CANDIDATES,
    "branch_rollouts": BRANCH_ROLLOUTS,
    "critical_steps": CRITICAL_STEPS,
    "runs": RUNS,
    "llm_calls": LLM_CALLS,
    "policy_evals": POLICY_EVALS,
    "policy_versions": POLICY_VERSIONS,
    "llm_batches": LLM_BATCHES,
}
