"""The paper's table at CPU scale (issue 8): does CSO, run through this pipeline, beat the baselines?

SIMULATION world (multi-hop look-ups, cso_lib.sim.world, compact prompt: cso_lib.experiment.tasks), REAL
models and training: the policy is the tiny Qwen2 of cso_lib.tiny_model (random init, its own tokenizer in which
every entity id, name, value and attribute of the world is one token), SFT'd here on the world solver's
demonstrations; the expert is the world's solver with set noise (SimExpert, `sim.expert_quality`); the PRM is
the world's noisy scorer (SimPRM, `sim.prm_noise`). Task sets (disjoint): SFT demonstrations, a validation set,
the train tasks that are run and mined, held-out tasks (cso_lib.experiment.tasks.experiment_splits).

1. pi0: SFT of the tiny model on the demonstrations (ids and answers relabelled at random per conversation,
   `sft_relabel`, so that the model learns to copy them from observations instead of memorising the train
   facts; see tasks.relabel), evaluated (greedy) on the VALIDATION tasks every
   `sft_eval_every` steps; training stops at the first checkpoint whose validation success reaches
   `pi0_target`, and pi0 is whichever of that checkpoint and the one before is closer to the target. The
   held-out tasks play no part in it. Shared by every seed unless `sft_per_seed`.
2. Per seed, pi0 runs every train task `samples_per_task` times (sampling) -> native JSONL logs.
3. The real pipeline (Spark + Delta: ingest, select, score_policy, propose, score_alternatives, rollouts with
   the policy in-process through `policy.provider=transformers`, build_pairs) in the paper's order, then the
   "w/o verification" pairs over the same scores and the baseline datasets (`cso baselines`: Step-DPO, ETO,
   RFT); "w/o PRM" (`cso.use_prm=false`) over the same warehouse.
4. Training from pi0: RFT (SFT on the successful logs), DPO (TRL) on ETO, Step-DPO, CSO, CSO w/o verification,
   CSO w/o PRM pairs. CSO round 2: the CSO model runs the train tasks again, the pipeline mines round 1, DPO
   from it with itself as the reference.
5. Held-out success (greedy) of every model, with a Wilson interval per seed and a t interval over seeds (and
   the validation success of every model, for tuning without looking at the held-out tasks).

    .venv/bin/python bench/paper_table.py --small             # quick setting, 1 seed
    .venv/bin/python bench/paper_table.py --seeds 0 1 2       # the table (>= 3 seeds)

Writes bench/results/paper_table.json and .md (or `--out`); work files under .cache/paper_table/<setting>-<hash of
the settings>/ (reused: a rerun with the same settings resumes after the last finished step of each seed, pi0
included; `--fresh` starts cold).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cso_lib.config import ModelConfig, load_config  # noqa: E402
from cso_lib.experiment import stats, tasks  # noqa: E402
from cso_lib.sim.world import SimWorld  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MINING_STAGES = ["ingest", "select", "score_policy", "propose", "score_alternatives", "rollouts", "build_pairs"]
METHODS = ["sft", "rft", "eto", "step_dpo", "cso_r1", "cso_r2", "cso_no_verify", "cso_no_prm"]
LABELS = {
    "sft": "SFT (pi0)", "rft": "+ RFT", "eto": "+ ETO (trajectory DPO)", "step_dpo": "+ Step-DPO (dense PRM pairs)",
    "cso_r1": "+ CSO, 1 round", "cso_r2": "+ CSO, 2 rounds", "cso_no_verify": "CSO w/o verification",
    "cso_no_prm": "CSO w/o PRM",
}


@dataclass(frozen=True)
class Settings:
    world_seed: int = 11
    n_entities: int = 400
    min_hops: int = 1
    max_hops: int = 2
    n_sft: int = 2000  # tasks [0, n_sft) give the SFT demonstrations
    n_val: int = 100  # validation tasks (pi0's step count is picked on these)
    n_train: int = 200  # train tasks the policy runs and the pipeline mines
    n_test: int = 200  # held-out tasks
    sft_relabel: bool = True  # demonstrations with ids and answers relabelled at random (tasks.relabel)
    init_std: float = 0.088  # random-init std (1/sqrt(hidden)): copying a rare one-token id needs a large embedding
    sft_steps: int = 1200  # the most SFT steps; training stops earlier once validation reaches pi0_target
    sft_schedule_steps: int = 1200  # cosine horizon (training may stop before its end)
    sft_eval_every: int = 50  # a checkpoint and a validation evaluation every this many steps
    pi0_target: float = 0.4  # validation success at which SFT stops (the middling band: 30-50%)
    sft_batch: int = 16
    sft_lr: float = 3e-3
    sft_per_seed: bool = False  # False: one SFT model (seed 0) shared by every seed
    samples_per_task: int = 2
    temperature: float = 1.0  # sampling of logs and branch rollouts; evaluation is greedy
    max_tokens: int = 48  # the longest solver action is ~40 tokens with the world-token tokenizer
    max_steps: int = 6  # actions per episode
    max_steps_after_branch: int = 5
    k: int = 3
    expert_quality: float = 0.7
    prm_noise: float = 0.12
    beta: float = 0.5
    dpo_epochs: float = 2.0
    dpo_lr: float = 5e-5
    dpo_batch: int = 8
    dpo_sft_weight: float = 0.0  # > 0: DPO + that weight of NLL on the chosen completion (TRL loss "sft"), every method
    rft_epochs: float = 2.0  # RFT passes over the successful logs (as DPO's dpo_epochs over its pairs)
    rft_lr: float = 3e-4
    batch_size: int = 50  # generation batch
    threads: int = 2


FULL = Settings()
SMALL = replace(FULL, n_train=60, n_test=100)


def log(msg: str) -> None:
    print(f"[paper_table {datetime.now(UTC).strftime('%H:%M:%S')}] {msg}", flush=True)


def world_of(s: Settings) -> SimWorld:
    return SimWorld(seed=s.world_seed, n_tasks=s.n_sft, n_entities=s.n_entities, min_hops=s.min_hops,
                    max_hops=s.max_hops)


def splits(s: Settings) -> dict[str, list[str]]:
    """The four disjoint task sets: sft, val, mine (the train tasks run and mined), test (held-out)."""
    return tasks.experiment_splits(world_of(s), s.n_sft, s.n_val, s.n_train, s.n_test)


def policy(model_dir: Path, s: Settings, seed: int, temperature: float, threads: int):
    from cso_lib.local_models import TransformersPolicy

    return TransformersPolicy(ModelConfig(provider="transformers", model=str(model_dir), params={
        "temperature": temperature, "max_tokens": s.max_tokens, "seed": seed, "batch_size": s.batch_size,
        "threads": threads}))


def done(path: Path) -> bool:
    return (path / "model.safetensors").exists()


# ---- steps -------------------------------------------------------------------------------------------
def sft_model(s: Settings, work: Path, seed: int) -> tuple[Path, dict]:
    """pi0 and its SFT record: trained on the demonstrations, stopped and picked on the validation tasks."""
    from cso_lib.experiment.train import sft
    from cso_lib.tiny_model import TinySpec, ensure_tiny_model

    seed = seed if s.sft_per_seed else 0
    root = work / "models" / f"sft-seed{seed}"
    pi0, record = root / "pi0", root / "sft.json"
    if not (done(pi0) and record.exists()):
        t0 = time.monotonic()
        spec = TinySpec(seed=seed, world_tokens=(s.world_seed, s.n_entities), initializer_range=s.init_std)
        init = ensure_tiny_model(root / "init", spec)
        world, sp = world_of(s), splits(s)
        demos = [tasks.demonstration(world, t) for t in sp["sft"]]
        if s.sft_relabel:
            rng = random.Random(seed)
            demos = [tasks.relabel(world, t, d, rng) for t, d in zip(sp["sft"], demos, strict=True)]
        curve: list[dict] = []

        def on_save(step: int, ckpt: Path) -> bool:
            ev = evaluate(s, ckpt, seed, sp["val"])
            curve.append({"step": step, "val": ev["rate"], "path": str(ckpt)})
            log(f"SFT seed {seed}: step {step}, validation success {ev['rate']:.2f} ({ev['successes']}/{ev['n']})")
            return ev["rate"] >= s.pi0_target

        log(f"SFT seed {seed}: {len(demos)} demonstrations, at most {s.sft_steps} steps, validation on "
            f"{len(sp['val'])} tasks every {s.sft_eval_every} steps, target {s.pi0_target}")
        r = sft(init, root / "train", demos, steps=s.sft_steps, batch_size=s.sft_batch, lr=s.sft_lr, seed=seed,
                threads=s.threads, schedule_steps=s.sft_schedule_steps, save_every=s.sft_eval_every,
                on_save=on_save, log_every=100)
        if not curve or curve[-1]["step"] != r["steps"]:  # ran to sft_steps: the last model is a candidate too
            on_save(r["steps"], root / "train")
        last = curve[-2:]
        pick = min(last, key=lambda c: abs(c["val"] - s.pi0_target)) if curve[-1]["val"] >= s.pi0_target \
            else max(curve, key=lambda c: c["val"])
        shutil.rmtree(pi0, ignore_errors=True)
        shutil.copytree(pick["path"], pi0)
        info = {"picked_step": pick["step"], "val_success": pick["val"], "n_val": len(sp["val"]),
                "reached_target": curve[-1]["val"] >= s.pi0_target, "curve": [
                    {k: c[k] for k in ("step", "val")} for c in curve],
                "steps_trained": r["steps"], "demonstrations": len(demos),
                "final_loss": r["losses"][-5:], "seconds": round(time.monotonic() - t0, 1)}
        record.write_text(json.dumps(info, indent=2))
        log(f"SFT seed {seed}: pi0 = step {pick['step']} (validation {pick['val']:.2f}), {info['seconds']:.0f}s")
    return pi0, json.loads(record.read_text())


def collect(s: Settings, model: Path, seed: int, round_: int, path: Path) -> dict:
    """The policy's logs on the train tasks (samples_per_task each, sampled)."""
    if not path.exists():
        world = world_of(s)
        items = [(f"{t}/r{round_}s{j}", t) for t in splits(s)["mine"] for j in range(s.samples_per_task)]
        eps = tasks.run_episodes(policy(model, s, seed, s.temperature, s.threads), world, items, s.max_steps,
                                 key=f"collect/{seed}/{round_}")
        tasks.write_logs([tasks.log_record(world, e, "tiny-qwen2", model.name, round_) for e in eps], path)
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return {"trajectories": len(recs), "successes": sum(r["outcome"] for r in recs)}


def pipeline_config(s: Settings, wh: Path, logs: Path, model: Path, seed: int, round_: int, run_id: str, **cso):
    cfg = load_config(None, [f"storage.warehouse={wh}", "spark.master=local[2]", "spark.shuffle_partitions=2"])
    cfg.ingest.paths = [str(logs)]
    cfg.sim.seed, cfg.sim.n_tasks, cfg.sim.n_entities = s.world_seed, s.n_sft, s.n_entities
    cfg.sim.min_hops, cfg.sim.max_hops = s.min_hops, s.max_hops
    cfg.sim.expert_quality, cfg.sim.prm_noise = s.expert_quality, s.prm_noise
    cfg.policy = ModelConfig(provider="transformers", model=str(model), params={
        "temperature": s.temperature, "max_tokens": s.max_tokens, "seed": seed, "batch_size": s.batch_size,
        "threads": 1})
    cfg.cso.k, cfg.cso.order, cfg.cso.max_steps_after_branch = s.k, "paper", s.max_steps_after_branch
    for key, value in cso.items():
        setattr(cfg.cso, key, value)
    cfg.round, cfg.select.round, cfg.run_id = round_, round_, run_id
    return cfg


def mine(spark, cfg, skip_ingest: bool = False) -> dict:
    """The pipeline's mining stages in order (taxonomy and export are left out: they make no pairs)."""
    from cso_lib.delta_io import ensure_tables
    from cso_lib.stages import pipeline, summary

    ensure_tables(spark, cfg)
    t0 = time.monotonic()
    for name in MINING_STAGES:
        if (name == "ingest" and skip_ingest) or (name == "rollouts" and not cfg.cso.verify):
            continue
        stage = pipeline.STAGES[name]
        log(f"  stage {name} (run {cfg.run_id}, verify={cfg.cso.verify}, use_prm={cfg.cso.use_prm})")
        stage(cfg, spark)
    out = summary.compute(cfg, spark)
    out.pop("tables", None)
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def read_parquet(path: str) -> list[dict]:
    import pyarrow.dataset as ds

    if not Path(path).exists():
        return []
    return ds.dataset(path, format="parquet", exclude_invalid_files=True).to_table().to_pylist()


def snapshot(sd: Path, name: str, path: str) -> None:
    """Copy a method's training records out of the warehouse (later stages may rewrite the Parquet)."""
    rows = read_parquet(path)
    (sd / "pairs").mkdir(exist_ok=True)
    (sd / "pairs" / f"{name}.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))


def load_snapshot(sd: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (sd / "pairs" / f"{name}.jsonl").read_text().splitlines()]


def strip(msgs: list[dict]) -> list[dict]:
    """Parquet message structs back to plain messages (no null fields)."""
    out = []
    for m in msgs:
        m = {k: v for k, v in m.items() if v is not None}
        if m.get("tool_calls"):
            m["tool_calls"] = [{k: v for k, v in c.items() if v is not None} for c in m["tool_calls"]]
        out.append(m)
    return out


def pairs_of(rows: list[dict]) -> list[dict]:
    return [{"prompt": strip(r["prompt"]), "chosen": strip(r["chosen"]), "rejected": strip(r["rejected"])}
            for r in rows]


def supervised_share(rows: list[dict], steps_total: int) -> float | None:
    keys = {(r["trajectory_id"], r["step_idx"]) for r in rows if r.get("step_idx") is not None}
    return len(keys) / steps_total if steps_total else None


def evaluate(s: Settings, model: Path, seed: int, task_ids: list[str]) -> dict:
    """Greedy success of the model on `task_ids` (held-out or validation tasks)."""
    eps = tasks.run_episodes(policy(model, s, seed, 0.0, s.threads), world_of(s),
                             [(f"{t}/eval", t) for t in task_ids], s.max_steps, key="eval")
    k = sum(e.success for e in eps)
    return {"successes": k, "n": len(eps), "rate": k / len(eps), "wilson95": list(stats.wilson(k, len(eps)))}


def quarantined(spark, cfg) -> dict[str, dict[str, int]]:
    """Quarantined log records by source file and reason (indices in the field path folded to [i])."""
    from pyspark.sql import functions as F

    from cso_lib.delta_io import read_table

    rows = (read_table(spark, cfg, "quarantine")
            .select(F.regexp_extract("source", r"([^/]+)$", 1).alias("file"),
                    F.regexp_replace(F.regexp_replace("reason", r"\[\d+\]", "[i]"), r"(not valid JSON).*", "$1")
                    .alias("reason"))
            .groupBy("file", "reason").count().collect())
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        out.setdefault(r["file"], {})[r["reason"]] = r["count"]
    return out


def run_seed(s: Settings, work: Path, seed: int, spark) -> dict:
    from cso_lib.experiment.train import dpo, sft
    from cso_lib.stages import baselines as baselines_stage
    from cso_lib.stages import build_pairs, summary

    sd = work / f"seed{seed}"
    sd.mkdir(parents=True, exist_ok=True)
    res_path = sd / "result.json"
    res = json.loads(res_path.read_text()) if res_path.exists() else {"methods": {}, "pipeline": {}, "seconds": {}}
    save = lambda: res_path.write_text(json.dumps(res, indent=2))  # noqa: E731
    clock = [time.monotonic()]

    def lap(name: str) -> None:  # seconds per phase (of this process: a resumed phase costs ~0)
        now = time.monotonic()
        res["seconds"][name] = round(res["seconds"].get(name, 0.0) + now - clock[0], 1)
        clock[0] = now

    m = sd / "models"
    sp = splits(s)
    pi0, res["pi0"] = sft_model(s, work, seed)
    lap("sft")
    res["collect_r0"] = collect(s, pi0, seed, 0, sd / "logs" / "round0.jsonl")
    log(f"seed {seed}: round-0 logs {res['collect_r0']}")
    lap("collect_r0")
    wh = sd / "wh"
    cfg = pipeline_config(s, wh, sd / "logs" / "round0.jsonl", pi0, seed, 0, f"s{seed}-r0")
    if "cso_r1" not in res["pipeline"]:
        res["pipeline"]["cso_r1"] = mine(spark, cfg)
        res["quarantine"] = quarantined(spark, cfg)
        nv = cfg.model_copy(deep=True)
        nv.cso.verify = False
        build_pairs.run(nv, spark)
        res["pipeline"]["cso_no_verify"] = {k: v for k, v in summary.compute(nv, spark).items() if k != "tables"}
        res["pipeline"]["baselines"] = baselines_stage.run(cfg, spark)
        snapshot(sd, "cso_r1", f"{cfg.storage.pairs_path}/round=0")
        snapshot(sd, "cso_no_verify", f"{cfg.storage.pairs_path}_unverified/round=0")
        for name in ("step_dpo", "eto", "rft"):
            snapshot(sd, name, f"{baselines_stage.baselines_path(cfg, name)}/round=0")
        save()
    lap("pipeline_r0")
    if "cso_no_prm" not in res["pipeline"]:
        # Same warehouse and work set, new run id: the scores, alternatives and rollouts already paid for are
        # reused; the candidates table's decisions are replaced by the ablation's (every step, every alternative),
        # and dpo_pairs/round=0 is rewritten with the ablation's pairs (a superset of CSO's, snapshot above).
        cfg_np = pipeline_config(s, wh, sd / "logs" / "round0.jsonl", pi0, seed, 0, f"s{seed}-r0-noprm", use_prm=False)
        res["pipeline"]["cso_no_prm"] = mine(spark, cfg_np, skip_ingest=True)
        snapshot(sd, "cso_no_prm", f"{cfg.storage.pairs_path}/round=0")
        save()
    lap("pipeline_no_prm")
    steps_failed = res["pipeline"]["cso_r1"]["steps"]
    data = {name: load_snapshot(sd, name) for name in ("cso_r1", "cso_no_verify", "cso_no_prm", "step_dpo", "eto")}
    rft_rows = load_snapshot(sd, "rft")
    models = {"sft": pi0}
    for name in ("cso_r1", "step_dpo", "eto", "cso_no_verify", "cso_no_prm"):
        out = m / name
        if not data[name]:  # no pairs: nothing to train, the method's policy is pi0 itself
            models[name] = pi0
            continue
        if not done(out):
            log(f"seed {seed}: DPO {name} on {len(data[name])} pairs")
            r = dpo(pi0, out, pairs_of(data[name]), beta=s.beta, epochs=s.dpo_epochs, lr=s.dpo_lr,
                    batch_size=s.dpo_batch, seed=seed, threads=s.threads, sft_weight=s.dpo_sft_weight)
            (out / "train.json").write_text(json.dumps({k: v for k, v in r.items()}, default=str))
        models[name] = out
    out = m / "rft"
    if not done(out):
        convs = [strip(r["messages"]) for r in rft_rows]
        log(f"seed {seed}: RFT on {len(convs)} successful trajectories")
        if convs:
            steps = max(1, math.ceil(s.rft_epochs * len(convs) / s.sft_batch))
            sft(pi0, out, convs, steps=steps, batch_size=s.sft_batch, lr=s.rft_lr, seed=seed, threads=s.threads,
                warmup=max(1, min(20, steps // 4)))
    models["rft"] = out if done(out) else pi0
    lap("train_r1")
    # round 2: the CSO model collects again; the pipeline mines round 1; DPO from it, reference = itself
    pi1 = models["cso_r1"]
    res["collect_r1"] = collect(s, pi1, seed, 1, sd / "logs" / "round1.jsonl")
    cfg1 = pipeline_config(s, wh, sd / "logs" / "round1.jsonl", pi1, seed, 1, f"s{seed}-r1")
    if "cso_r2" not in res["pipeline"]:
        res["pipeline"]["cso_r2"] = mine(spark, cfg1)
        res["quarantine"] = quarantined(spark, cfg1)
        snapshot(sd, "cso_r2", f"{cfg.storage.pairs_path}/round=1")
        save()
    data["cso_r2"] = load_snapshot(sd, "cso_r2")
    out = m / "cso_r2"
    if data["cso_r2"] and not done(out):
        log(f"seed {seed}: DPO cso_r2 on {len(data['cso_r2'])} pairs")
        dpo(pi1, out, pairs_of(data["cso_r2"]), ref_dir=pi1, beta=s.beta, epochs=s.dpo_epochs, lr=s.dpo_lr,
            batch_size=s.dpo_batch, seed=seed, threads=s.threads, sft_weight=s.dpo_sft_weight)
    models["cso_r2"] = out if data["cso_r2"] else pi1
    lap("round_2")
    evals: dict[str, dict] = {}  # by model folder: a method that trained nothing is its starting policy
    for name in METHODS:
        if name in res["methods"] and "rate" in res["methods"][name]:
            evals.setdefault(str(models[name]), res["methods"][name])
            continue
        log(f"seed {seed}: evaluating {name} ({models[name]})")
        if str(models[name]) not in evals:
            evals[str(models[name])] = {**evaluate(s, models[name], seed, sp["test"]),
                                        "val_rate": evaluate(s, models[name], seed, sp["val"])["rate"]}
        ev = {k: evals[str(models[name])][k] for k in ("successes", "n", "rate", "wilson95", "val_rate")}
        ev["model"] = str(models[name].relative_to(work))
        rows = data.get(name, [])
        ev["pairs"] = len(rows) if name not in ("sft", "rft") else 0
        ev["sft_records"] = len(rft_rows) if name == "rft" else 0
        if name in ("cso_r1", "cso_no_verify", "cso_no_prm", "step_dpo"):
            ev["share_steps_supervised"] = supervised_share(rows, steps_failed if name != "cso_no_prm" else
                                                            res["pipeline"]["cso_no_prm"]["steps"])
        elif name == "cso_r2":
            ev["share_steps_supervised"] = supervised_share(rows, res["pipeline"]["cso_r2"]["steps"])
        elif name == "eto":
            # a trajectory pair supervises every step of the failed trajectory it rejects
            ev["share_steps_supervised"] = 1.0 if rows else 0.0
        res["methods"][name] = ev
        log(f"seed {seed}: {name} held-out success {ev['rate']:.3f} ({ev['successes']}/{ev['n']}), "
            f"validation {ev['val_rate']:.3f}")
        save()
    lap("evaluate")
    save()
    return res


def table(per_seed: dict[int, dict]) -> dict:
    out = {}
    base = [r["methods"]["sft"]["rate"] for r in per_seed.values() if "sft" in r.get("methods", {})]
    for name in METHODS:
        runs = [r["methods"][name] for r in per_seed.values() if name in r.get("methods", {})]
        if not runs:
            continue
        agg = stats.over_seeds([r["rate"] for r in runs])
        diff = stats.paired_difference([r["rate"] for r in runs], base) if len(base) == len(runs) else None
        k, n = sum(r["successes"] for r in runs), sum(r["n"] for r in runs)
        shares = [r.get("share_steps_supervised") for r in runs if r.get("share_steps_supervised") is not None]
        out[name] = {
            "label": LABELS[name],
            "success_rate": agg["mean"],
            "ci95_over_seeds": agg["ci95"],
            # minus pi0's success on the same seed (same held-out tasks), mean and 95% t interval over seeds
            "vs_sft": None if diff is None else {"mean": diff["mean"], "ci95": diff["ci95"]},
            "wilson95_pooled": list(stats.wilson(k, n)),
            "per_seed": [r["rate"] for r in runs],
            "val_rate": stats.over_seeds([r["val_rate"] for r in runs])["mean"],
            "pairs": [r["pairs"] for r in runs],
            "sft_records": [r["sft_records"] for r in runs] if name == "rft" else None,
            "share_steps_supervised": sum(shares) / len(shares) if shares else None,
        }
    return out


def quarantine_counts(by_file: dict[str, dict[str, int]]) -> str:
    """'n0 / n1': quarantined records of the round-0 and round-1 logs."""
    return " / ".join(str(sum(by_file.get(f"round{r}.jsonl", {}).values())) for r in (0, 1))


def markdown(result: dict) -> str:
    """The table as Markdown (docs/paper-table.md quotes it)."""
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    def signed(x):
        return f"{100 * x:+.1f}"

    pi0 = result["pi0"]
    lines = [f"setting `{result['setting']}`, seeds {result['seeds']}, held-out tasks per seed "
             f"{result['settings']['n_test']}, `{result['command']}`, {result['date']}; wall time of this invocation "
             f"{result['seconds'] / 60:.1f} min ({'cold: pi0 trained in this run' if result['cold'] else 'warm: resumed'}"
             f"); compute time of all phases (summed over the invocations that did them) "
             f"{result['phase_seconds_total'] / 60:.1f} min; "
             f"pi0 = SFT step {pi0['picked_step']} (validation success {pct(pi0['val_success'])}% on "
             f"{pi0['n_val']} validation tasks); quarantined log records per seed "
             f"(round 0 / round 1 logs) {[quarantine_counts(q) for q in result['quarantined']]}", "",
             "| method | held-out success % | 95% CI over seeds | Wilson 95% (pooled) | vs pi0, points (95% CI) "
             "| per seed % | validation % | pairs | steps supervised % |",
             "| --- | ---: | --- | --- | --- | --- | ---: | --- | ---: |"]
    for name, row in result["methods"].items():
        ci = row["ci95_over_seeds"]
        lo, hi = row["wilson95_pooled"]
        pairs = row["sft_records"] if row["sft_records"] is not None else row["pairs"]
        d = row.get("vs_sft")
        vs = "-" if name == "sft" or d is None else (
            signed(d["mean"]) + ("" if d["ci95"] is None else f" ({signed(d['ci95'][0])} to {signed(d['ci95'][1])})"))
        lines.append(f"| {row['label']} | {pct(row['success_rate'])} | "
                     f"{'-' if ci is None else f'{pct(ci[0])}-{pct(ci[1])}'} | {pct(lo)}-{pct(hi)} | {vs} | "
                     f"{', '.join(pct(x) for x in row['per_seed'])} | {pct(row['val_rate'])} | "
                     f"{', '.join(map(str, pairs))}{' SFT records' if row['sft_records'] is not None else ''} | "
                     f"{pct(row['share_steps_supervised'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    t0 = time.monotonic()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="the quick setting (fewer tasks)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0 with --small, else 0 1 2)")
    p.add_argument("--out", default=None, help="result JSON (default bench/results/paper_table[_small].json)")
    p.add_argument("--work", default=None, help="work folder (default .cache/paper_table/<setting>-<hash>)")
    p.add_argument("--fresh", action="store_true", help="delete the work folder first (a cold run)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a setting")
    args = p.parse_args(argv)
    s = SMALL if args.small else FULL
    for kv in args.set:
        key, value = kv.split("=", 1)
        kind = type(getattr(s, key))
        s = replace(s, **{key: value.lower() in ("1", "true", "yes") if kind is bool else kind(value)})
    seeds = args.seeds if args.seeds is not None else ([0] if args.small else [0, 1, 2])
    name = "small" if args.small else "full"
    tag = hashlib.sha256(json.dumps(asdict(s), sort_keys=True).encode()).hexdigest()[:8]
    work = Path(args.work or ROOT / ".cache" / "paper_table" / f"{name}-{tag}")  # new settings, new folder
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    cold = not (work / "models").exists() and not any(work.glob("seed*"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "settings.json").write_text(json.dumps(asdict(s), indent=2))
    from cso_lib.spark import build_spark

    spark = build_spark(pipeline_config(s, work / "_wh", work / "none.jsonl", work, 0, 0, "x"), "paper-table")
    per_seed = {}
    for seed in seeds:
        per_seed[seed] = run_seed(s, work, seed, spark)
    spark.stop()
    sp = splits(s)
    result = {
        "setting": name,
        "methods": table(per_seed),
        "pi0": per_seed[seeds[0]]["pi0"],
        "quarantined": [per_seed[k].get("quarantine", {}) for k in seeds],
        "per_seed": {str(k): v for k, v in per_seed.items()},
        "settings": asdict(s),
        "task_sets": {k: [v[0], v[-1], len(v)] for k, v in sp.items()},
        "seeds": seeds,
        "seconds": round(time.monotonic() - t0, 1),
        "cold": cold,
        # each seed's phase times accumulate over the invocations that did the work (a cached phase adds ~0), so
        # this is the cost of the whole table even when this invocation resumed a finished one
        "phase_seconds_total": round(sum(sum(r["seconds"].values()) for r in per_seed.values()), 1),
        "models": "policy: tiny Qwen2 (cso_lib.tiny_model with world_tokens, random init, SFT'd here); expert: the "
                  "world's solver with set noise (SimExpert); PRM: the world's noisy scorer (SimPRM). SIMULATION "
                  "world.",
        "command": " ".join([".venv/bin/python", "bench/paper_table.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Spark local[2], torch threads {s.threads}",
    }
    out = Path(args.out or HERE / "results" / f"paper_table{'_small' if args.small else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    for row in result["methods"].values():
        ci = row["ci95_over_seeds"] or row["wilson95_pooled"]
        log(f"{row['label']:<32} {row['success_rate']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] pairs {row['pairs']}")
    return result


if __name__ == "__main__":
    main()
