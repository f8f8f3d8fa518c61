"""The paper-table experiment's parts at a tiny size: splits, demonstrations, SFT, episodes, intervals.

The pure-Python checks run in the fast suite; the ones that build and train the tiny model are `slow`.
"""

from __future__ import annotations

import pytest

from cso_lib.experiment import stats, tasks
from cso_lib.messages import final_answer
from cso_lib.sim.world import SimWorld


@pytest.fixture(scope="module")
def world():
    return SimWorld(seed=5, n_tasks=40, n_entities=60, min_hops=1, max_hops=2)


def test_demonstrations_solve_their_tasks(world):
    for tid in world.task_ids()[:10]:
        demo = tasks.demonstration(world, tid)
        assert world.answer_ok(world.task(tid), final_answer(demo[-1]))
        assert [m["role"] for m in demo[:2]] == ["system", "user"]


def test_experiment_splits_are_disjoint_and_keep_questions_apart(world):
    sp = tasks.experiment_splits(world, 30, 10, 10, 20)
    assert [len(sp[k]) for k in ("sft", "val", "mine", "test")] == [30, 10, 10, 20]
    q = lambda t: (world.task(t).person_id, world.task(t).plan)  # noqa: E731
    assert len({t for ids in sp.values() for t in ids}) == 70
    sft_q = {q(t) for t in sp["sft"]}
    assert not sft_q & {q(t) for t in sp["val"]}  # pi0 is picked on questions it was not trained on
    assert not (sft_q | {q(t) for t in sp["val"] + sp["mine"]}) & {q(t) for t in sp["test"]}


def test_world_vocabulary_covers_what_the_policy_copies(world):
    from cso_lib.tiny_model import world_vocabulary

    vocab = set(world_vocabulary(world.seed, world.n_entities))
    task = world.task(world.task_ids()[0])
    assert set(task.chain) <= vocab and set(task.plan) <= vocab  # ids, values, attributes
    assert world.kb[task.person_id]["name"] in vocab


class Solver:
    """A policy that plays the world's solver (all episodes succeed) or always answers "x" (none do)."""

    def __init__(self, world, good):
        self.world, self.good = world, good

    def act(self, requests, ctx=None):
        from cso_lib.messages import assistant, call

        if not self.good:
            return [assistant("", [call("c", "final_answer", {"answer": "x"})]) for _ in requests]
        return [self.world.solver_action(self.world.task(r.task_id), r.state, f"call_{r.step_idx}") for r in requests]


def test_episodes_and_log_records(world):
    items = [(f"{t}/e", t) for t in world.task_ids()[:6]]
    good = tasks.run_episodes(Solver(world, True), world, items, max_steps=6)
    bad = tasks.run_episodes(Solver(world, False), world, items, max_steps=6)
    assert tasks.success_rate(good) == 1.0 and tasks.success_rate(bad) == 0.0
    rec = tasks.log_record(world, bad[0], "m", "v", 0)
    from cso_lib.ingest import convert

    traj = convert(rec, "sim")
    assert traj is not None and rec["outcome"] == 0


def test_intervals():
    lo, hi = stats.wilson(0, 50)
    assert lo == 0.0 and 0 < hi < 0.1
    assert stats.over_seeds([0.5])["ci95"] is None
    agg = stats.over_seeds([0.2, 0.3, 0.4])
    assert agg["ci95"][0] < agg["mean"] < agg["ci95"][1]
    # paired by seed: a steady +5 points is significant although the two intervals over seeds overlap
    base, better = [0.20, 0.30, 0.40], [0.25, 0.36, 0.44]
    d = stats.paired_difference(better, base)
    assert d["ci95"][0] > 0 and stats.over_seeds(better)["ci95"][0] < stats.over_seeds(base)["ci95"][1]
    assert stats.paired_difference([0.3], [0.2])["ci95"] is None
    with pytest.raises(ValueError, match="same seeds"):
        stats.paired_difference([0.3, 0.4], [0.2])


def test_paper_table_aggregates_seeds_against_pi0(monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "paper_table", Path(__file__).resolve().parent.parent / "bench" / "paper_table.py")
    pt = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "paper_table", pt)  # its dataclasses look their module up there
    spec.loader.exec_module(pt)

    def run(rate, **extra):
        return {"rate": rate, "successes": int(rate * 100), "n": 100, "val_rate": rate, "pairs": 10,
                "sft_records": 0, **extra}

    per_seed = {s: {"methods": {"sft": run(0.25 + s / 100), "cso_r1": run(0.30 + s / 100,
                                                                            share_steps_supervised=0.1 * (s + 1))},
                    "seconds": {"sft": 10.0 * (s == 0), "evaluate": 5.0}} for s in range(3)}
    out = pt.table(per_seed)
    assert out["sft"]["vs_sft"]["mean"] == 0
    assert out["cso_r1"]["vs_sft"]["mean"] == pytest.approx(0.05) and out["cso_r1"]["vs_sft"]["ci95"][0] == \
        pytest.approx(0.05)  # the same gain on every seed: no spread
    assert out["cso_r1"]["per_seed"] == [0.30, 0.31, 0.32] and out["cso_r1"]["share_steps_supervised"] == \
        pytest.approx(0.2)
    assert out["cso_r1"]["wilson95_pooled"][0] < 0.31 < out["cso_r1"]["wilson95_pooled"][1]
    md = pt.markdown({"setting": "full", "seeds": [0, 1, 2], "settings": {"n_test": 100}, "command": "c", "date": "d",
                      "seconds": 60.0, "cold": False, "phase_seconds_total": 150.0, "methods": out,
                      "pi0": {"picked_step": 600, "val_success": 0.3, "n_val": 100}, "quarantined": [{}, {}, {}]})
    row = next(line for line in md.splitlines() if line.startswith("| + CSO, 1 round"))
    assert "| 31.0 |" in row and "+5.0 (+5.0 to +5.0)" in row and "2.5 min" in md


@pytest.mark.slow
def test_sft_lowers_loss_and_eval_gives_a_rate(world, tmp_path):
    from cso_lib.experiment.train import encode, sft
    from cso_lib.tiny_model import TinySpec, ensure_tiny_model

    init = ensure_tiny_model(tmp_path / "init", TinySpec(num_hidden_layers=1))
    demos = [tasks.demonstration(world, t) for t in world.task_ids()[:8]]
    from transformers import AutoTokenizer

    ids, labels = encode(AutoTokenizer.from_pretrained(init), demos[0])
    assert 0 < sum(lab != -100 for lab in labels) < len(ids)  # assistant tokens only
    r = sft(init, tmp_path / "sft", demos, steps=12, batch_size=4, lr=3e-3, log_every=0)
    assert sum(r["losses"][-3:]) < sum(r["losses"][:3])
    seen = []
    r = sft(init, tmp_path / "stopped", demos, steps=12, batch_size=4, log_every=0, save_every=3,
            on_save=lambda step, path: seen.append(step) or step >= 6)
    assert seen == [3, 6] and r["steps"] == 6 and (tmp_path / "stopped" / "step-6" / "model.safetensors").exists()

    from cso_lib.config import ModelConfig
    from cso_lib.local_models import TransformersPolicy

    pol = TransformersPolicy(ModelConfig(provider="transformers", model=str(tmp_path / "sft"),
                                         params={"temperature": 0, "max_tokens": 24, "threads": 1}))
    eps = tasks.run_episodes(pol, world, [(f"{t}/e", t) for t in world.task_ids()[:3]], max_steps=2)
    rate = tasks.success_rate(eps)
    assert 0.0 <= rate <= 1.0 and all(e.n_steps >= 1 for e in eps)

    # DPO (TRL) on two step pairs shaped like the pipeline's: chosen = the solver's action, rejected = a wrong one
    from cso_lib.experiment.train import dpo
    from cso_lib.messages import assistant, call

    pairs = [{"prompt": d[:2], "chosen": [d[2]],
              "rejected": [assistant("I will search.", [call("c", "search", {"query": "nobody"})])]} for d in demos[:2]]
    out = dpo(tmp_path / "sft", tmp_path / "dpo", pairs, epochs=1, batch_size=2, threads=1)
    assert out["pairs"] == 2 and (tmp_path / "dpo" / "model.safetensors").exists()


@pytest.mark.slow
def test_world_token_model_copies_in_one_token_and_loss_matches(world):
    import torch

    from cso_lib.experiment.train import _assistant_loss, encode
    from cso_lib.tiny_model import TinySpec, build_model, build_tokenizer

    spec = TinySpec(num_hidden_layers=1, world_tokens=(world.seed, world.n_entities))
    tok = build_tokenizer(spec)
    task = world.task(world.task_ids()[1])
    for word in (task.person_id, task.answer, task.plan[0], world.kb[task.person_id]["name"]):
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    demo = tasks.demonstration(world, task.task_id)
    text = tok.apply_chat_template(demo, tokenize=False)
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    model = build_model(tok, spec)
    ids, labels = encode(tok, demo)
    ids, labels = torch.tensor([ids]), torch.tensor([labels])
    att = torch.ones_like(ids)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=att, labels=labels).loss
        got = _assistant_loss(torch, model, ids, att, labels)
    assert torch.allclose(want, got, atol=1e-5)


@pytest.mark.slow
def test_dpo_scores_assistant_tokens_only_in_trajectory_pairs(world, tmp_path):
    """ETO's whole-trajectory pairs: the tool results inside the completions are not the policy's tokens, so the
    DPO log-probabilities leave them out; one-action pairs (CSO, Step-DPO) keep every completion token."""
    from transformers import AutoTokenizer

    from cso_lib.experiment.train import assistant_masks, assistant_only_collator, dpo
    from cso_lib.tiny_model import TinySpec, ensure_tiny_model

    init = ensure_tiny_model(tmp_path / "init", TinySpec(num_hidden_layers=1))
    tok = AutoTokenizer.from_pretrained(init)
    a, b = (tasks.demonstration(world, t) for t in world.task_ids()[:2])
    trajectory = {"prompt": a[:2], "chosen": a[2:], "rejected": b[2:]}
    m = assistant_masks(tok, trajectory)
    cut = len(m["chosen_full_ids"]) - len(m["chosen_assistant"])
    completion = m["chosen_full_ids"][cut:]
    kept = tok.decode([t for t, k in zip(completion, m["chosen_assistant"], strict=True) if k])
    dropped = tok.decode([t for t, k in zip(completion, m["chosen_assistant"], strict=True) if not k])
    tool_text = next(x["content"] for x in a[2:] if x["role"] == "tool")
    assert tool_text in dropped and tool_text not in kept
    assert final_answer(a[-1]) in kept and "final_answer" in kept
    step = {"prompt": a[:2], "chosen": [a[2]], "rejected": [b[2]]}
    assert all(assistant_masks(tok, step)["chosen_assistant"])

    # the collator: TRL's completion mask times the assistant mask; ids that are not TRL's are an error
    def example(pair):
        mm = assistant_masks(tok, pair)
        cut = len(mm["chosen_full_ids"]) - len(mm["chosen_assistant"])
        return {"prompt_ids": mm["chosen_full_ids"][:cut], "chosen_ids": mm["chosen_full_ids"][cut:],
                "rejected_ids": mm["rejected_full_ids"][cut:], **mm}

    coll = assistant_only_collator(tok.pad_token_id, 1024, "keep_start")
    batch = coll([example(trajectory), example(step)])
    want = sum(m["chosen_assistant"]) + sum(m["rejected_assistant"]) + len(example(step)["chosen_ids"]) + \
        len(example(step)["rejected_ids"])
    assert int(batch["completion_mask"].sum()) == want
    bad = example(step)
    bad["chosen_ids"] = bad["chosen_ids"][:-1]
    with pytest.raises(ValueError, match="does not match TRL's tokens"):
        coll([bad])
    # and TRL's own tokenization agrees with the masks (the trainer would raise otherwise)
    out = dpo(init, tmp_path / "eto", [trajectory, step], epochs=1, batch_size=2, threads=1)
    assert out["pairs"] == 2 and (tmp_path / "eto" / "model.safetensors").exists()
