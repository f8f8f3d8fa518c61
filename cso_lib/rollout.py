"""Branch rollouts: replace a_t by an alternative, execute it, let the policy continue to the end.

All active branches advance in lockstep: one batched `policy.act` call per turn for every branch still
running (a vLLM backend batches and prefix-caches them), then each branch's tool calls run; finished
branches drop out. The step budget counts policy steps after the branch point, never from step 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cso_lib.envs import Environment
from cso_lib.messages import Message, final_answer
from cso_lib.models import Policy, StepRequest


@dataclass
class Branch:
    trajectory_id: str
    task_id: str
    env: str
    step_idx: int
    alt_idx: int
    rollout_idx: int
    state: list[Message]  # s_t, rebuilt from the log
    alternative: Message  # a'_t
    tools: list[dict] | None = None
    continuation: list[Message] = field(default_factory=list)
    steps_after_branch: int = 0
    status: str = "running"  # running | answered | budget_exhausted
    answer: str | None = None

    @property
    def key(self) -> str:
        return f"branch/{self.trajectory_id}/{self.step_idx}/{self.alt_idx}/{self.rollout_idx}"

    def _take(self, action: Message, env: Environment) -> None:
        self.continuation.append(action)
        answer = final_answer(action)
        if answer is not None:
            self.status, self.answer = "answered", answer
            return
        self.continuation.extend(env.execute(self.task_id, self.state + self.continuation, action))


def run_branches(branches: list[Branch], policy: Policy, envs: dict[str, Environment], budget: int,
                 ctx=None) -> list[Branch]:
    """Run every branch to an answer or to `budget` policy steps after the branch point.

    `ctx` (a LedgerContext) journals a provider-backed policy's answers as they arrive."""
    for b in branches:
        b._take(b.alternative, envs[b.env])
    active = [b for b in branches if b.status == "running"]
    while active:
        requests = [
            StepRequest(b.trajectory_id, b.task_id, b.env, b.step_idx + 1 + b.steps_after_branch,
                        b.state + b.continuation, b.tools, key=b.key)
            for b in active
        ]
        for b, action in zip(active, policy.act(requests, ctx), strict=True):
            b.steps_after_branch += 1
            b._take(action, envs[b.env])
            if b.status == "running" and b.steps_after_branch >= budget:
                b.status = "budget_exhausted"
        active = [b for b in active if b.status == "running"]
    return branches
