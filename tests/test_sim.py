"""The simulation world: determinism and the ground truth the quality measures rely on. Pure Python."""

import statistics

from cso_lib.envs import SimEnvironment
from cso_lib.messages import final_answer, iter_states, native_step
from cso_lib.models import ScoreRequest, SimExpert, SimPRM, StepRequest
from cso_lib.rollout import Branch, run_branches
from cso_lib.sim.logs import trajectory_records
from cso_lib.sim.world import SimWorld, canonical

WORLD = SimWorld(seed=3, n_tasks=60, n_entities=80)


class QuietPolicy:
    """The scripted policy with no errors: isolates what the alternative itself does."""

    name = "quiet"

    def act(self, requests, ctx=None):
        return [WORLD.policy_action(WORLD.task(r.task_id), r.state, r.key, 0.0, 0.0)[0] for r in requests]


def _records(error_rate=0.25):
    return list(trajectory_records(WORLD, error_rate, 0.05, "v0"))


def _states(rec):
    preamble = [{"role": "system", "content": rec["system_prompt"]}, {"role": "user", "content": rec["query"]}]
    steps = [native_step(s["action"], s["observation"]) for s in rec["steps"]]
    return preamble, steps


def test_logs_are_deterministic_and_outcomes_true():
    a, b = _records(), _records()
    assert a == b
    for rec in a:
        task = WORLD.task(rec["task_id"])
        answer = final_answer(rec["steps"][-1]["action"])
        assert rec["outcome"] == int(WORLD.answer_ok(task, answer)) and rec["ground_truth"] == task.answer


def test_error_free_policy_always_succeeds():
    assert all(r["outcome"] == 1 for r in _records(error_rate=0.0) if not r["metadata"]["injected_errors"])
    assert all(r["outcome"] == 1 for r in trajectory_records(WORLD, 0.0, 0.0, "v0"))


def test_failure_rate_follows_error_rate():
    low = statistics.mean(1 - r["outcome"] for r in trajectory_records(WORLD, 0.05, 0.0, "v0"))
    high = statistics.mean(1 - r["outcome"] for r in trajectory_records(WORLD, 0.4, 0.0, "v0"))
    assert low < high and high > 0.5


def test_correct_alternatives_succeed_and_wrong_ones_fail():
    """What makes verified precision meaningful: in this world only the right action can lead to the answer."""
    expert, env = SimExpert(WORLD, 1.0), {"sim": SimEnvironment(WORLD)}
    outcomes = {True: [], False: []}
    for rec in _records():
        if rec["outcome"]:
            continue
        preamble, steps = _states(rec)
        task = WORLD.task(rec["task_id"])
        for t, state in iter_states(preamble, steps):
            for j, alt in enumerate(expert.propose([StepRequest(rec["trajectory_id"], rec["task_id"], "sim", t, list(state))], 5)[0]):
                b = Branch(rec["trajectory_id"], rec["task_id"], "sim", t, j, 0, list(state), alt)
                run_branches([b], QuietPolicy(), env, 12)
                outcomes[WORLD.is_correct(task, state, alt)].append(WORLD.answer_ok(task, b.answer))
    assert outcomes[True] and all(outcomes[True])
    assert outcomes[False] and not any(outcomes[False])


def test_expert_alternatives_are_distinct_and_quality_controls_the_fix():
    rec = next(r for r in _records() if not r["outcome"])
    preamble, steps = _states(rec)
    task = WORLD.task(rec["task_id"])
    state = preamble + [steps[0][0]] + steps[0][1]
    req = StepRequest(rec["trajectory_id"], rec["task_id"], "sim", 1, state)
    alts = SimExpert(WORLD, 1.0).propose([req], 5)[0]
    assert len({canonical(a) for a in alts}) == len(alts) <= 5
    assert any(WORLD.is_correct(task, state, a) for a in alts)
    assert not any(WORLD.is_correct(task, state, a) for a in SimExpert(WORLD, 0.0).propose([req], 5)[0])


def test_prm_separates_correct_from_wrong_actions():
    prm = SimPRM(WORLD, 0.05)
    good, bad = [], []
    for rec in _records():
        preamble, steps = _states(rec)
        task = WORLD.task(rec["task_id"])
        for t, state in iter_states(preamble, steps):
            score = prm.score([ScoreRequest(rec["trajectory_id"], rec["task_id"], "sim", t, list(state), action=steps[t][0])])[0]
            assert 0.0 <= score.score <= 1.0 and score.status == "ok"
            (good if WORLD.is_correct(task, state, steps[t][0]) else bad).append(score.score)
    assert statistics.mean(good) > 0.7 > 0.6 > statistics.mean(bad)
