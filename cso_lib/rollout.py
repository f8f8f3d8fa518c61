"""Branch rollouts: replace a_t by an alternative, execute it, let the policy continue to the end.

All active branches advance in lockstep: one batched `policy.act` call per turn for every branch still
running (a vLLM backend batches and prefix-caches them), then the tool calls of all branches run
concurrently (threads: sandbox processes, browsers and look-ups wait in parallel); finished branches drop out
and release what their environment held. The step budget counts policy steps after the branch point, never
from step 0.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
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
    status: str = "running"  # running | answered | budget_exhausted | error
    answer: str | None = None
    error: str | None = None  # why the environment failed (status error)

    @property
    def key(self) -> str:
        return f"branch/{self.trajectory_id}/{self.step_idx}/{self.alt_idx}/{self.rollout_idx}"

    def _take(self, action: Message, env: Environment) -> None:
        self.continuation.append(action)
        answer = final_answer(action)
        if answer is not None:
            self.status, self.answer = "answered", answer
            return
        try:
            self.continuation.extend(env.execute(self.task_id, self.state + self.continuation, action, self.key))
        except Exception as e:  # an environment crash (not a tool error, which is an observation) ends this branch
            self.status, self.error = "error", f"env {self.env!r} failed: {type(e).__name__}: {e}"


def run_branches(branches: list[Branch], policy: Policy, envs: dict[str, Environment], budget: int,
                 ctx=None, tool_threads: int = 8) -> list[Branch]:
    """Run every branch to an answer or to `budget` policy steps after the branch point.

    `ctx` (a LedgerContext) journals a provider-backed policy's answers as they arrive."""
    pool = ThreadPoolExecutor(max_workers=max(1, tool_threads), thread_name_prefix="cso-tools")

    def take_all(pairs: list[tuple[Branch, Message]]) -> None:
        list(pool.map(lambda p: p[0]._take(p[1], envs[p[0].env]), pairs))

    try:
        take_all([(b, b.alternative) for b in branches])
        active = [b for b in branches if b.status == "running"]
        while active:
            requests = [
                StepRequest(b.trajectory_id, b.task_id, b.env, b.step_idx + 1 + b.steps_after_branch,
                            b.state + b.continuation, b.tools, key=b.key, sample=b.rollout_idx)
                for b in active
            ]
            actions = policy.act(requests, ctx)
            for b in active:
                b.steps_after_branch += 1
            take_all(list(zip(active, actions, strict=True)))
            for b in active:
                if b.status == "running" and b.steps_after_branch >= budget:
                    b.status = "budget_exhausted"
            active = [b for b in active if b.status == "running"]
    finally:
        pool.shutdown(wait=True)
        for b in branches:
            envs[b.env].release(b.key)
    return branches
