"""Environments a branch rollout executes actions in.

An environment runs an action's tool calls and returns the observation messages, and declares whether a
logged trajectory can be replayed faithfully (state a replay cannot rebuild means the branch is skipped
with a reason, never run wrongly).
"""

from __future__ import annotations

from typing import Protocol

from cso_lib.messages import Message
from cso_lib.sim.world import SimWorld


class Environment(Protocol):
    name: str

    def replayable(self, task_id: str) -> str | None:
        """None if a branch of this task can be rebuilt from its log; otherwise the reason it cannot."""

    def execute(self, task_id: str, state: list[Message], action: Message) -> list[Message]: ...


class SimEnvironment:
    """The simulation world's tools. Stateless look-ups: every state replays exactly."""

    name = "sim"

    def __init__(self, world: SimWorld) -> None:
        self.world = world

    def replayable(self, task_id: str) -> str | None:
        try:
            self.world.task(task_id)
        except (KeyError, ValueError) as e:
            return f"task {task_id!r} is not in this simulation world: {e}"
        if not task_id.startswith(f"sim-{self.world.seed}-"):
            return f"task {task_id!r} belongs to another simulation seed than {self.world.seed}"
        return None

    def execute(self, task_id: str, state: list[Message], action: Message) -> list[Message]:
        return self.world.execute(action)


def environment_for(env: str, world: SimWorld | None) -> Environment | None:
    """The environment a trajectory's `env` names, or None when this build has none for it."""
    if env == "sim" and world is not None:
        return SimEnvironment(world)
    return None
