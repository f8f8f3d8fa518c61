"""Branch rollouts: lockstep batching and the step budget counted from the branch point. Pure Python."""

from cso_lib.envs import SimEnvironment
from cso_lib.messages import final_answer
from cso_lib.rollout import Branch, run_branches
from cso_lib.sim.world import SYSTEM_PROMPT, SimWorld

WORLD = SimWorld(seed=5, n_tasks=40, n_entities=60, min_hops=4, max_hops=4)
ENVS = {"sim": SimEnvironment(WORLD)}


class CountingPolicy:
    """Error-free scripted policy that records the size of each batched call."""

    name = "counting"

    def __init__(self):
        self.batches = []

    def act(self, requests, ctx=None):
        self.batches.append(len(requests))
        return [WORLD.policy_action(WORLD.task(r.task_id), r.state, r.key, 0.0, 0.0)[0] for r in requests]


def _solved_prefix(task_id, n_steps):
    """The first n_steps of the solver's path, and the solver's action at step n_steps (the 'alternative')."""
    task = WORLD.task(task_id)
    state = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": task.query}]
    for _ in range(n_steps):
        action = WORLD.solver_action(task, state)
        state += [action, *WORLD.execute(action)]
    return state, WORLD.solver_action(task, state)


def _branch(task_id, t, budget):
    state, alt = _solved_prefix(task_id, t)
    b = Branch("traj", task_id, "sim", t, 0, 0, state, alt)
    run_branches([b], CountingPolicy(), ENVS, budget)
    return b


def test_budget_counts_from_the_branch_point():
    task_id = WORLD.task_ids()[0]
    # A 4-hop task: search, 4 lookups, answer = 6 steps. Branching at step 3 with the right lookup leaves
    # 1 lookup + the answer = 2 policy steps after the branch point.
    late = _branch(task_id, 3, budget=2)
    assert late.status == "answered" and late.steps_after_branch == 2
    assert WORLD.answer_ok(WORLD.task(task_id), late.answer)
    assert _branch(task_id, 3, budget=1).status == "budget_exhausted"
    # An absolute cap (step index + steps) would have stopped this branch: 3 + 2 > 2.
    early = _branch(task_id, 1, budget=4)
    assert early.status == "answered" and early.steps_after_branch == 4
    assert _branch(task_id, 1, budget=3).status == "budget_exhausted"


def test_alternative_that_answers_ends_the_branch_at_once():
    task_id = WORLD.task_ids()[1]
    b = _branch(task_id, 5, budget=1)  # the alternative at step 5 is the final answer itself
    assert b.status == "answered" and b.steps_after_branch == 0 and final_answer(b.continuation[0]) == b.answer


def test_branches_advance_in_lockstep():
    policy = CountingPolicy()
    branches = []
    for i, task_id in enumerate(WORLD.task_ids()[:8]):
        state, alt = _solved_prefix(task_id, 1 + i % 3)
        branches.append(Branch(f"t{i}", task_id, "sim", 1 + i % 3, 0, 0, state, alt))
    run_branches(branches, policy, ENVS, 10)
    assert all(b.status == "answered" for b in branches)
    # One call per turn for all live branches, shrinking as branches finish, never one call per branch.
    assert policy.batches[0] == 8 and policy.batches == sorted(policy.batches, reverse=True)
    assert len(policy.batches) == max(b.steps_after_branch for b in branches)
    # The continuation starts with the alternative and its observation; the state is untouched.
    assert all(b.continuation[0] is b.alternative and b.continuation[1]["role"] == "tool" for b in branches)
