"""From the pipeline's pairs to a trained policy: TRL round trip, DPO on the CPU, LoRA, the exports, evaluation.

The session's simulated pipeline run (with the export stage, tests/conftest.py) is copied for the module; the tiny local chat model
(cso_lib.tiny_model) is the policy that is trained.
"""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F
from test_exports import validate_sharegpt_ranking

from cso_lib.config import load_config
from cso_lib.delta_io import read_table
from cso_lib.errors import TrainError
from cso_lib.ingest import convert
from cso_lib.stages import evaluate
from cso_lib.stages.export import round_dir, sibling_path
from cso_lib.train import load_pairs, pair_files, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mined(sim_pipeline):
    """The session's simulated pipeline run with exports (tests/conftest.py: 40 tasks), this module's copy."""
    cfg, result, base = sim_pipeline
    assert result["summary"]["pairs"] >= 6 and "export" in result
    return cfg, result, base


def _train_cfg(cfg, tiny_model_dir, out, *extra):
    return load_config(None, [
        f"storage.warehouse={cfg.storage.warehouse}", f"train.model={tiny_model_dir}", f"train.output_dir={out}",
        "train.report_to=none", "train.logging_steps=1", "train.batch_size=4", "train.grad_accum=1",
        "train.max_truncated_share=0", *extra])


def _first_pairs(cfg, path, n):
    """The first n pairs of the round (same rows, same format) as their own Parquet file."""
    table = pq.read_table(pair_files(cfg)[0]).slice(0, n)
    pq.write_table(table, path)
    return str(path)


def test_pairs_round_trip_through_datasets_and_the_dpo_trainer(mined, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    cfg, result, _ = mined
    ds = load_pairs(pair_files(cfg))
    assert len(ds) == result["summary"]["pairs"]
    assert {"prompt", "chosen", "rejected", "tools", "trajectory_id", "step_idx", "r_policy", "r_expert",
            "verified", "run_id"} <= set(ds.column_names)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = DPOConfig(output_dir=str(tmp_path / "o"), max_steps=1, report_to="none", max_length=None, bf16=False)
    trainer = DPOTrainer(model=str(tiny_model_dir), args=args, train_dataset=ds, processing_class=tok)
    processed = trainer.train_dataset
    assert len(processed) == len(ds)
    for raw, ex in zip(ds, processed, strict=True):
        prompt, chosen = tok.decode(ex["prompt_ids"]), tok.decode(ex["chosen_ids"])
        # the prompt is s_t with the tools, rendered by the model's own template, and ends at the turn start
        assert "# Tools" in prompt and json.loads(raw["tools"])[0]["function"]["name"] in prompt
        assert prompt.endswith("<|im_start|>assistant\n")
        for msg in raw["prompt"]:
            for c in msg["tool_calls"] or []:  # earlier actions keep their tool calls
                assert f'<tool_call>{{"name": "{c["function"]["name"]}", "arguments": {c["function"]["arguments"]}}}' \
                       in prompt
        # chosen / rejected are the single assistant turn, its tool call intact (name and JSON arguments)
        for side, text in (("chosen", chosen), ("rejected", tok.decode(ex["rejected_ids"]))):
            for c in raw[side][0]["tool_calls"] or []:
                call = text.split("<tool_call>", 1)[1].split("</tool_call>", 1)[0]
                assert json.loads(call) == {"name": c["function"]["name"],
                                            "arguments": json.loads(c["function"]["arguments"])}
            assert text.endswith("<|im_end|>\n")
        assert ex["chosen_ids"] != ex["rejected_ids"]


def test_dpo_on_pipeline_pairs_lowers_the_loss_and_widens_the_margin(mined, tiny_model_dir, tmp_path):
    cfg, _, _ = mined
    pairs = _first_pairs(cfg, tmp_path / "pairs.parquet", 4)
    tcfg = _train_cfg(cfg, tiny_model_dir, tmp_path / "policy", f"train.pairs=[{pairs}]", "train.max_steps=4",
                      "train.learning_rate=5e-4", "train.seed=0")
    out = train(tcfg)
    logs = [h for h in out["history"] if "loss" in h]
    assert len(logs) == 4 and out["pairs"] == 4 and out["beta"] == 0.5
    first, last = logs[0], logs[-1]
    assert last["loss"] < first["loss"] - 0.2, (first["loss"], last["loss"])
    assert last["rewards/margins"] > first["rewards/margins"] + 0.5
    assert last["rewards/accuracies"] == 1.0
    saved = Path(out["output_dir"])
    assert (saved / "model.safetensors").exists() and (saved / "tokenizer_config.json").exists()
    assert json.loads((saved / "train_metrics.json").read_text())[0]["loss"] == first["loss"]
    assert json.loads((saved / "cso_train.json").read_text())["ref_model"] == str(tiny_model_dir)


def test_lora_training_merges_into_a_full_policy(mined, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg, _, _ = mined
    pairs = _first_pairs(cfg, tmp_path / "pairs.parquet", 4)
    tcfg = _train_cfg(cfg, tiny_model_dir, tmp_path / "lora", f"train.pairs=[{pairs}]", "train.max_steps=2",
                      "train.lora=true", "train.learning_rate=1e-3", "train.lora_r=4", "train.report_to=tensorboard")
    out = train(tcfg)
    assert out["lora"] and (tmp_path / "lora" / "adapter" / "adapter_config.json").exists()
    assert list((tmp_path / "lora" / "runs").rglob("events.out.tfevents.*"))  # the tracker got the metrics
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not any("lora" in k for k in merged.state_dict())
    changed = [k for k, v in merged.state_dict().items() if not v.equal(base.state_dict()[k])]
    assert changed and all("proj" in k for k in changed)


def test_refuses_to_truncate_more_than_the_configured_share(mined, tiny_model_dir, tmp_path):
    cfg, _, _ = mined
    tcfg = _train_cfg(cfg, tiny_model_dir, tmp_path / "never", "train.max_length=64", "train.max_truncated_share=0.1")
    with pytest.raises(TrainError, match=r"are longer than train.max_length=64 tokens"):
        train(tcfg)
    assert not (tmp_path / "never").exists()


def test_llamafactory_export_validates_against_its_documented_format(mined):
    cfg, result, _ = mined
    folder = Path(round_dir(cfg)) / "_llamafactory"
    info = json.loads((folder / "dataset_info.json").read_text())
    (name, entry), = info.items()
    lines = (folder / entry["file_name"]).read_text().splitlines()
    assert len(lines) == result["summary"]["pairs"] == result["export"]["llamafactory_records"]
    for line in lines:
        rec = json.loads(line)
        validate_sharegpt_ranking(rec, entry)
        assert rec["chosen"]["from"] == "function_call"  # the sim's fixes are tool calls


def test_data_card_step_credit_and_prm_stepwise(spark, mined):
    cfg, result, _ = mined
    card = json.loads((Path(round_dir(cfg)) / "_data_card.json").read_text())
    n = result["summary"]["pairs"]
    assert card["counts"]["pairs"] == n and card["counts"]["chosen_with_tool_calls"] == n
    assert card["thresholds"]["decisions"] == [{"gamma_low": 0.45, "gamma_high": 0.65, "k": 5, "order": "prm_first"}]
    assert card["lengths"]["prompt_messages"]["min"] >= 2 and card["sources"]["verifiers"]
    assert (Path(round_dir(cfg)) / "_data_card.md").read_text().startswith("# Data card")

    credit = pq.read_table(f"{sibling_path(cfg, 'step_credit')}/round=0").to_pylist()
    br = read_table(spark, cfg, "branch_rollouts").where(F.col("status") != "skipped")
    assert sum(r["rollouts"] for r in credit if r["source"] == "branch_rollout") == br.count()
    assert sum(r["successes"] for r in credit) == br.where("success").count()
    logged = [r for r in credit if r["source"] == "logged"]
    assert logged and all(r["value"] == 0.0 and r["alt_idx"] == -1 for r in logged)
    verified = {(r["trajectory_id"], r["step_idx"], r["alt_idx"]) for r in
                read_table(spark, cfg, "critical_steps").collect()}
    good = {(r["trajectory_id"], r["step_idx"], r["alt_idx"]) for r in credit if r["value"] > 0}
    assert good == verified
    for r in credit:
        assert r["value"] == r["successes"] / r["rollouts"] and r["prompt"][-1]["role"] in ("user", "tool")

    steps = pq.read_table(f"{sibling_path(cfg, 'prm_stepwise')}/round=0").to_pylist()
    assert len(steps) == 2 * n
    for r in steps:
        assert len(r["completions"]) == len(r["labels"]) >= 1 and isinstance(r["prompt"], str)
        assert r["labels"][:-1] == [True] * (len(r["labels"]) - 1)
        assert r["labels"][-1] is (r["path"] == "verified")


def test_evaluation_records_success_rate_with_a_wilson_interval(spark, mined):
    cfg, _, base = mined
    ecfg = cfg.model_copy(deep=True)
    ecfg.eval.n_tasks, ecfg.run_id = 30, None
    out = evaluate.run(ecfg, spark)
    row = read_table(spark, cfg, "policy_evals").where(F.col("task_set") == out["task_set"]).collect()
    assert len(row) == 1 and row[0]["policy_version"] == "sim-policy-v0" and row[0]["n_tasks"] == 30
    r = row[0]
    assert r["task_set"] == "sim(seed=7)[40:70]" and 0 <= r["ci_low"] < r["success_rate"] < r["ci_high"] <= 1
    lines = Path(r["episodes_path"]).read_text().splitlines()
    assert len(lines) == 30
    trajs = [convert(json.loads(line), "sim") for line in lines]  # the logs are valid input
    assert sum(t.outcome for t in trajs) == r["successes"] and all(t.round == 0 for t in trajs)
