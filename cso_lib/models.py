"""The model interface every stage uses: a policy acts, an expert proposes, a PRM scores.

Each takes a batch of requests (so a backend can batch, rate-limit and cache them) and returns one result
per request, in order. The simulation world's scripted models implement it here; real providers
(OpenAI-compatible HTTP, Anthropic, vLLM and transformers in-process) plug in behind the same three
methods. Models are built inside executors from the configuration, once per Python worker (`get_models`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol

from cso_lib.config import Config, ModelConfig
from cso_lib.errors import ConfigError
from cso_lib.messages import Message, signature
from cso_lib.sim.world import PRM_MEAN, SimWorld, _rng, fingerprint


@dataclass
class StepRequest:
    """The state s_t of one trajectory: what the policy saw when it chose action t."""

    trajectory_id: str
    task_id: str
    env: str
    step_idx: int
    state: list[Message]
    tools: list[dict] | None = None
    key: str = ""  # distinguishes repeated samples of the same state (rollout index, branch)


@dataclass
class ScoreRequest(StepRequest):
    action: Message = field(default_factory=dict)


@dataclass
class Score:
    score: float | None  # None: unscored (the judge's answer did not parse); never a default value
    reasoning: str | None
    status: str = "ok"


class Policy(Protocol):
    name: str

    def act(self, requests: list[StepRequest], ctx=None) -> list[Message]: ...


class Expert(Protocol):
    name: str

    def propose(self, requests: list[StepRequest], k: int, ctx=None) -> list[list[Message]]: ...


class PRM(Protocol):
    name: str

    def score(self, requests: list[ScoreRequest], ctx=None) -> list[Score]: ...


# `ctx` is a cso_lib.llm_models.LedgerContext for provider-backed models (ledger hits, journal); the
# simulated models make no requests and ignore it.


# ---- the simulation world's models (SIMULATION: scripted, with known truth) -------------------------
class SimPolicy:
    def __init__(self, world: SimWorld, error_rate: float, slip_rate: float) -> None:
        self.world, self.error_rate, self.slip_rate = world, error_rate, slip_rate
        self.name = f"sim-policy(seed={world.seed},err={error_rate},slip={slip_rate})"

    def act(self, requests: list[StepRequest], ctx=None) -> list[Message]:
        return [
            self.world.policy_action(self.world.task(r.task_id), r.state, r.key, self.error_rate, self.slip_rate)[0]
            for r in requests
        ]


class SimExpert:
    """Proposes k distinct alternatives; with probability `quality` one of them is the solver's action."""

    def __init__(self, world: SimWorld, quality: float) -> None:
        self.world, self.quality = world, quality
        self.name = f"sim-expert(seed={world.seed},quality={quality})"

    def propose(self, requests: list[StepRequest], k: int, ctx=None) -> list[list[Message]]:
        out = []
        for r in requests:
            task = self.world.task(r.task_id)
            rng = _rng("expert", self.world.seed, r.trajectory_id, r.step_idx, fingerprint(r.state))
            call_id = f"call_{r.step_idx}"
            good = self.world.solver_action(task, r.state, call_id)
            alts = [good] if rng.random() < self.quality else []
            seen = {signature(good)}
            for _, action in self.world._variants(task, r.state, rng, call_id):
                if len(alts) >= k:
                    break
                if signature(action) not in seen:
                    seen.add(signature(action))
                    alts.append(action)
            rng.shuffle(alts)
            out.append(alts)
        return out


class SimPRM:
    """Score = the truth's mean for the kind of action + Gaussian noise, clipped to [0, 1]."""

    def __init__(self, world: SimWorld, noise: float) -> None:
        self.world, self.noise = world, noise
        self.name = f"sim-prm(seed={world.seed},noise={noise})"

    def score(self, requests: list[ScoreRequest], ctx=None) -> list[Score]:
        out = []
        for r in requests:
            kind = self.world.action_kind(self.world.task(r.task_id), r.state, r.action)
            rng = _rng("prm", self.world.seed, fingerprint(r.state), signature(r.action))
            value = min(1.0, max(0.0, PRM_MEAN[kind] + rng.gauss(0.0, self.noise)))
            out.append(Score(round(value, 4), f"[simulated PRM] action judged {kind}"))
        return out


# ---- construction -----------------------------------------------------------------------------------
@dataclass
class Models:
    policy: Policy
    expert: Expert
    prm: PRM
    world: SimWorld | None


def build_models(cfg: Config) -> Models:
    """The configured models; `sim` roles are the simulation world's, the others provider-backed."""
    from cso_lib.llm_models import LLMPRM, LLMExpert, LLMPolicy

    for role in ("policy", "expert", "prm"):
        mc: ModelConfig = getattr(cfg, role)
        if mc.provider in ("vllm", "transformers"):
            raise ConfigError(
                f"{role}.provider={mc.provider!r} is not available in this version (in-process engines are "
                "tracked in the project's issues); use 'openai' with a `vllm serve` endpoint"
            )
    world = SimWorld.from_config(cfg.sim)
    share = 1.0 / cfg.tasks_at_once
    return Models(
        policy=SimPolicy(world, cfg.sim.policy_error_rate, cfg.sim.policy_slip_rate)
        if cfg.policy.provider == "sim" else LLMPolicy(cfg.policy, share),
        expert=SimExpert(world, cfg.sim.expert_quality) if cfg.expert.provider == "sim" else LLMExpert(cfg.expert, share),
        prm=SimPRM(world, cfg.sim.prm_noise) if cfg.prm.provider == "sim" else LLMPRM(cfg.prm, share),
        world=world,
    )


@lru_cache(maxsize=4)
def get_config(cfg_json: str) -> Config:
    return Config.model_validate(json.loads(cfg_json))


@lru_cache(maxsize=4)
def get_models(cfg_json: str) -> Models:
    """Models for a serialized config, built once per Python worker and reused across tasks."""
    return build_models(get_config(cfg_json))

