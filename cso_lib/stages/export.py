"""Per-round exports of the pairs for trainers: data card, LLaMA-Factory file, step credit, PRM stepwise data.

Everything about round r's pairs sits next to them (names starting with `_` are skipped by Spark and by
`*.parquet` globs, so `datasets.load_dataset("parquet", data_files=".../round=0/*.parquet")` still reads only
the pairs):

    dpo_pairs/round=<r>/_data_card.json, _data_card.md     counts, lengths, sources, thresholds
    dpo_pairs/round=<r>/_llamafactory/cso_pairs_round<r>.jsonl + dataset_info.json
                                                           LLaMA-Factory sharegpt ranking format
    step_credit/round=<r>/                                 per (state, action): rollouts, successes, value
    prm_stepwise/round=<r>/                                TRL stepwise supervision (prompt, completions, labels)

The last two come from branch rollouts and exist only with verification. Each export is rewritten whole
per round, so reruns give the same files. Definitions in cso_lib.exports.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import orjson
from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    BooleanType,
    DoubleType,
    IntegerType,
    StringType,
    StructField,
    StructType,
)

from cso_lib import exports
from cso_lib.config import Config
from cso_lib.delta_io import new_run_id, read_table, stage_run
from cso_lib.messages import state_at, to_struct
from cso_lib.models import build_models
from cso_lib.stages.build_pairs import pairs_path
from cso_lib.stages.common import map_batches, parse_bundle, steps_json, write_round_parquet
from schemas.tables import MESSAGES

STEP_CREDIT = StructType(
    [
        StructField("prompt", MESSAGES, nullable=False),  # s_t
        StructField("action", MESSAGES, nullable=False),  # one assistant message
        StructField("tools", StringType(), nullable=True),
        StructField("trajectory_id", StringType(), nullable=False),
        StructField("task_id", StringType(), nullable=False),
        StructField("step_idx", IntegerType(), nullable=False),
        StructField("alt_idx", IntegerType(), nullable=False),  # -1: the logged policy action
        StructField("source", StringType(), nullable=False),  # branch_rollout | logged
        StructField("policy_model", StringType(), nullable=False),  # the policy that continued after the action
        StructField("rollouts", IntegerType(), nullable=False),
        StructField("successes", IntegerType(), nullable=False),
        StructField("value", DoubleType(), nullable=False),  # successes / rollouts: Monte Carlo estimate of Q(s_t, a)
        StructField("prm_score", DoubleType(), nullable=True),  # the configured PRM's score of the action
        StructField("round", IntegerType(), nullable=False),
    ]
)

PRM_STEPWISE = StructType(
    [
        StructField("prompt", StringType(), nullable=False),
        StructField("completions", ArrayType(StringType(), containsNull=False), nullable=False),
        StructField("labels", ArrayType(BooleanType(), containsNull=False), nullable=False),
        StructField("path", StringType(), nullable=False),  # logged (ends with the rejected action) | verified
        StructField("trajectory_id", StringType(), nullable=False),
        StructField("step_idx", IntegerType(), nullable=False),
        StructField("alt_idx", IntegerType(), nullable=False),
        StructField("round", IntegerType(), nullable=False),
    ]
)

QUANTILES = [0.5, 0.9, 0.99]
log = logging.getLogger("cso.export")


def round_dir(cfg: Config) -> str:
    return f"{pairs_path(cfg)}/round={cfg.round}"


def sibling_path(cfg: Config, name: str) -> str:
    """A dataset next to dpo_pairs/ (same parent folder or URI prefix)."""
    return f"{cfg.storage.pairs_path.rstrip('/').rsplit('/', 1)[0]}/{name}"


def write_text(spark: SparkSession, path: str, chunks) -> None:
    """Write text to a local path or any Hadoop URI (HDFS, object stores), replacing it."""
    chunks = [chunks] if isinstance(chunks, str) else chunks
    if "://" not in path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(chunks)
        tmp.replace(path)
        return
    jvm = spark.sparkContext._jvm
    hpath = jvm.org.apache.hadoop.fs.Path(path)
    out = hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()).create(hpath, True)
    try:
        for chunk in chunks:
            out.write(bytearray(chunk.encode()))
    finally:
        out.close()


# ---- data card ---------------------------------------------------------------------------------------
def dist(values: list) -> dict[str, Any]:
    """min, mean, p50, p90, p99, max of numbers (nulls left out).

    >>> dist([3, 1, 2, None])
    {'min': 1, 'mean': 2.0, 'p50': 2, 'p90': 3, 'p99': 3, 'max': 3}
    """
    v = sorted(x for x in values if x is not None)
    if not v:
        return {}
    q = {f"p{int(p * 100)}": v[min(len(v) - 1, int(p * len(v)))] for p in QUANTILES}
    return {"min": v[0], "mean": round(sum(v) / len(v), 4), **q, "max": v[-1]}


def _tally(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items()))


def data_card(spark: SparkSession, cfg: Config, pairs: DataFrame) -> dict[str, Any]:
    """Counts, length distributions, sources and the thresholds actually used, of one round's pairs.

    One small row per pair (ids, lengths, scores; no message text) is collected and summarised here."""
    keys = ["trajectory_id", "step_idx"]
    chars = lambda c: F.length(F.to_json(c))  # noqa: E731
    calls = lambda c: F.coalesce(F.size(F.col(c)[0]["tool_calls"]), F.lit(0))  # noqa: E731
    rows = [r.asDict() for r in pairs.select(
        *keys, "alt_idx", "task_id", "policy_version", "run_id", "verifier", "r_policy", "r_expert",
        F.size("prompt").alias("prompt_messages"), chars("prompt").alias("prompt_chars"),
        chars("chosen").alias("chosen_chars"), chars("rejected").alias("rejected_chars"),
        calls("chosen").alias("chosen_calls"), calls("rejected").alias("rejected_calls")).collect()]
    cands = read_table(spark, cfg, "critical_candidates").join(pairs.select(*keys).distinct(), keys, "left_semi")
    thresholds = [r.asDict() for r in cands.select("gamma_low", "gamma_high", "k", "order").distinct().collect()]
    cs = [r.asDict() for r in read_table(spark, cfg, "critical_steps").where(
        (F.col("round") == cfg.round) & (F.col("verified") == cfg.cso.verify)).select("env", "error_category").collect()]
    models = build_models(cfg)
    col = lambda name: [r[name] for r in rows]  # noqa: E731
    return {
        "round": cfg.round,
        "path": round_dir(cfg),
        "verified": cfg.cso.verify,
        "counts": {
            "pairs": len(rows),
            "trajectories": len(set(col("trajectory_id"))),
            "tasks": len(set(col("task_id"))),
            "critical_steps": len({(r["trajectory_id"], r["step_idx"]) for r in rows}),
            "chosen_with_tool_calls": sum(1 for r in rows if r["chosen_calls"]),
            "rejected_with_tool_calls": sum(1 for r in rows if r["rejected_calls"]),
            "by_step_idx": _tally(col("step_idx")),
            "by_error_category": _tally(r["error_category"] or "(unclassified)" for r in cs),
        },
        "lengths": {c: dist(col(c)) for c in ("prompt_messages", "prompt_chars", "chosen_chars", "rejected_chars")},
        "scores": {c: dist(col(c)) for c in ("r_policy", "r_expert")},
        "sources": {
            "policy_versions": _tally(col("policy_version")),
            "run_ids": _tally(col("run_id")),
            "verifiers": _tally(col("verifier")),
            "envs": _tally(r["env"] for r in cs),
            "models_at_export": {"policy": models.policy.name, "expert": models.expert.name, "prm": models.prm.name},
        },
        "thresholds": {"decisions": sorted(thresholds, key=json.dumps),
                       "rollouts_per_alternative": cfg.cso.rollouts_per_alternative,
                       "max_steps_after_branch": cfg.cso.max_steps_after_branch},
    }


def card_markdown(card: dict[str, Any]) -> str:
    c = card["counts"]
    lines = [f"# Data card: CSO pairs, round {card['round']}", "",
             f"`{card['path']}`, {'verified' if card['verified'] else 'UNVERIFIED (ablation)'} pairs, "
             "TRL conversational preference format (prompt / chosen / rejected message lists, tools as JSON).", "",
             "## Counts", "", "| what | n |", "| --- | --- |"]
    lines += [f"| {k.replace('_', ' ')} | {v} |" for k, v in c.items() if not isinstance(v, dict)]
    lines += ["", "By step index: " + ", ".join(f"{k}: {v}" for k, v in c["by_step_idx"].items()),
              "", "By error category: " + (", ".join(f"{k}: {v}" for k, v in c["by_error_category"].items()) or "-"),
              "", "## Lengths and scores", "", "| field | min | mean | p50 | p90 | p99 | max |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, d in {**card["lengths"], **card["scores"]}.items():
        if d:
            lines.append(f"| {name} | " + " | ".join(str(d[k]) for k in ("min", "mean", "p50", "p90", "p99", "max")) + " |")
    s, t = card["sources"], card["thresholds"]
    lines += ["", "## Sources", ""] + [f"- {k.replace('_', ' ')}: {v}" for k, v in s.items()]
    lines += ["", "## Thresholds", ""] + [
        f"- gamma_low {d['gamma_low']}, gamma_high {d['gamma_high']}, k {d['k']}, order {d['order']}"
        for d in t["decisions"]]
    lines += [f"- rollouts per alternative {t['rollouts_per_alternative']}, "
              f"max steps after branch {t['max_steps_after_branch']}", ""]
    return "\n".join(lines)


# ---- LLaMA-Factory -------------------------------------------------------------------------------------
def write_llamafactory(spark: SparkSession, cfg: Config, pairs: DataFrame) -> dict[str, Any]:
    """The round's pairs as a sharegpt ranking JSONL file plus its dataset_info.json, streamed from Spark."""
    out_dir = f"{round_dir(cfg)}/_llamafactory"
    name, file_name = f"cso_round{cfg.round}", f"cso_pairs_round{cfg.round}.jsonl"
    notes: dict[str, int] = {}
    skipped: list[dict[str, Any]] = []
    written = 0

    def lines():
        nonlocal written
        for row in pairs.select("prompt", "chosen", "rejected", "tools", "trajectory_id", "step_idx", "alt_idx") \
                .orderBy("trajectory_id", "step_idx", "alt_idx").toLocalIterator():
            pair = row.asDict(recursive=True)
            try:
                rec, row_notes = exports.llamafactory_record(pair)
            except exports.ExportError as e:
                skipped.append({"trajectory_id": pair["trajectory_id"], "step_idx": pair["step_idx"],
                                "alt_idx": pair["alt_idx"], "reason": str(e)})
                continue
            for note in row_notes:
                notes[note] = notes.get(note, 0) + 1
            written += 1
            yield json.dumps(rec, ensure_ascii=False) + "\n"

    write_text(spark, f"{out_dir}/{file_name}", lines())
    write_text(spark, f"{out_dir}/dataset_info.json",
               json.dumps(exports.llamafactory_dataset_info(name, file_name), indent=2) + "\n")
    return {"path": out_dir, "dataset": name, "records": written, "skipped": skipped, "notes": notes}


# ---- step credit ----------------------------------------------------------------------------------------
def step_credit_rows(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        preamble, steps, _, todo = parse_bundle(row)
        for item in todo:
            t = item["step_idx"]
            action = orjson.loads(item["action"]) if item["alt_idx"] >= 0 else steps[t][0]
            out.append(dict(
                prompt=[to_struct(m) for m in state_at(preamble, steps, t)], action=[to_struct(action)],
                tools=row["tools"], trajectory_id=row["trajectory_id"], task_id=row["task_id"], step_idx=t,
                alt_idx=item["alt_idx"], source=item["source"], policy_model=item["policy_model"],
                rollouts=item["rollouts"], successes=item["successes"],
                value=item["successes"] / item["rollouts"], prm_score=item.get("prm_score"), round=row["round"]))
    return out


def step_credit(spark: SparkSession, cfg: Config) -> DataFrame:
    """Per (state, action) of the round's branched steps: rollouts, successes and their ratio.

    Each branched alternative counts its non-skipped rollouts per continuing policy. The logged action at
    the same step counts as one rollout that failed (the logged trajectory itself: only failed trajectories
    are mined)."""
    models = build_models(cfg)
    keys = ["trajectory_id", "step_idx", "alt_idx"]
    traj = read_table(spark, cfg, "trajectories").where(F.col("round") == cfg.round).select(
        "trajectory_id", "task_id", "tools", "preamble", "round", "policy_model", "outcome")
    convs = traj.join(steps_json(spark, cfg, traj), "trajectory_id")
    br = (read_table(spark, cfg, "branch_rollouts").where(F.col("status") != "skipped")
          .join(convs.select("trajectory_id"), "trajectory_id", "left_semi"))
    alts = read_table(spark, cfg, "expert_alternatives").where(F.col("expert_model") == models.expert.name)
    branched = (br.groupBy(*keys, "policy_model")
                .agg(F.count("*").cast("int").alias("rollouts"),
                     F.coalesce(F.sum(F.col("success").cast("int")), F.lit(0)).cast("int").alias("successes"))
                .join(alts.select(*keys, "action"), keys)
                .withColumn("source", F.lit("branch_rollout")))
    logged = (branched.select("trajectory_id", "step_idx").distinct()
              .join(convs.where(F.col("outcome") == 0).select("trajectory_id", "policy_model"), "trajectory_id")
              .select("trajectory_id", "step_idx", F.lit(-1).alias("alt_idx"), "policy_model",
                      F.lit(1).alias("rollouts"), F.lit(0).alias("successes"), F.lit(None).cast("string").alias("action"),
                      F.lit("logged").alias("source")))
    scores = read_table(spark, cfg, "prm_scores").where(F.col("prm_model") == models.prm.name)
    todo = (branched.unionByName(logged)
            .join(scores.select(*keys, F.col("score").alias("prm_score")), keys, "left"))
    cols = [c for c in todo.columns if c != "trajectory_id"]
    todo_g = todo.groupBy("trajectory_id").agg(F.to_json(F.collect_list(F.struct(*cols))).alias("todo_json"))
    bundled = convs.join(todo_g, "trajectory_id").repartition(max(1, cfg.spark.shuffle_partitions), "trajectory_id")
    return map_batches(bundled, step_credit_rows, STEP_CREDIT)


# ---- PRM stepwise supervision ---------------------------------------------------------------------------
def stepwise_rows(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        cont = orjson.loads(row["continuation"]) if row["continuation"] else None
        for ex in exports.stepwise_records(orjson.loads(row["prompt"]), orjson.loads(row["rejected"]),
                                           orjson.loads(row["chosen"]), cont):
            out.append({**ex, "trajectory_id": row["trajectory_id"], "step_idx": row["step_idx"],
                        "alt_idx": row["alt_idx"], "round": row["round"]})
    return out


def prm_stepwise(spark: SparkSession, cfg: Config) -> DataFrame:
    """Two stepwise examples per verified pair of the round (exports.stepwise_records)."""
    models = build_models(cfg)
    keys = ["trajectory_id", "step_idx", "alt_idx"]
    cs = read_table(spark, cfg, "critical_steps").where((F.col("round") == cfg.round) & F.col("verified"))
    first_success = Window.partitionBy(*keys).orderBy("rollout_idx")
    cont = (read_table(spark, cfg, "branch_rollouts")
            .where((F.col("policy_model") == models.policy.name) & F.col("success"))
            .withColumn("_n", F.row_number().over(first_success)).where("_n = 1").select(*keys, "continuation"))
    todo = cs.select(*keys, "prompt", "chosen", "rejected", "round").join(cont, keys, "left")
    return map_batches(todo.repartition(max(1, cfg.spark.shuffle_partitions), "trajectory_id"), stepwise_rows,
                       PRM_STEPWISE)




# ---- the stage -----------------------------------------------------------------------------------------
def run(cfg: Config, spark: SparkSession) -> dict:
    """Write round `cfg.round`'s data card, LLaMA-Factory file, step credit and PRM stepwise data."""
    run_id = cfg.run_id or new_run_id("export")
    rdir = round_dir(cfg)
    try:
        pairs = spark.read.parquet(rdir)
    except AnalysisException:  # no such folder: build_pairs wrote no pair for this round
        log.warning("export: no pairs at %s (round %d); nothing to export", rdir, cfg.round)
        return {"run_id": run_id, "skipped": f"no pairs at {rdir}"}
    with stage_run(spark, cfg, run_id, "export") as stats:
        pairs = pairs.withColumn("round", F.lit(cfg.round)).persist()
        stats["rows_in"] = pairs.count()
        card = data_card(spark, cfg, pairs)
        lf = write_llamafactory(spark, cfg, pairs)
        card["llamafactory"] = {k: lf[k] for k in ("path", "dataset", "records", "notes")} | {
            "skipped": len(lf["skipped"])}
        stats["llamafactory_records"] = lf["records"]
        stats["llamafactory_skipped"] = lf["skipped"][:20]
        if cfg.cso.verify:
            stats["step_credit_rows"] = write_round_parquet(step_credit(spark, cfg), sibling_path(cfg, "step_credit"),
                                                     ["trajectory_id", "step_idx", "alt_idx", "policy_model"])
            stats["prm_stepwise_rows"] = write_round_parquet(prm_stepwise(spark, cfg), sibling_path(cfg, "prm_stepwise"),
                                                      ["trajectory_id", "step_idx", "alt_idx", "path"])
            card["step_level"] = {"step_credit": f"{sibling_path(cfg, 'step_credit')}/round={cfg.round}",
                                  "step_credit_rows": stats["step_credit_rows"],
                                  "prm_stepwise": f"{sibling_path(cfg, 'prm_stepwise')}/round={cfg.round}",
                                  "prm_stepwise_rows": stats["prm_stepwise_rows"]}
        write_text(spark, f"{rdir}/_data_card.json", json.dumps(card, indent=2, default=str) + "\n")
        write_text(spark, f"{rdir}/_data_card.md", card_markdown(card))
        stats["rows_out"] = lf["records"]
        stats["card"] = f"{rdir}/_data_card.json"
        pairs.unpersist()
    return {"run_id": run_id, **stats}
