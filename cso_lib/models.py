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

from cso_lib import prompts
from cso_lib.config import Config
from cso_lib.errors import ConfigError
from cso_lib.messages import Message, signature, tool_calls
from cso_lib.sim.world import ERROR_CATEGORY, PRM_MEAN, SimWorld, _rng, fingerprint


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
    sample: int = 0  # repeated rollouts of one branch: an HTTP policy sends `seed` = sample for sample > 0


@dataclass
class ScoreRequest(StepRequest):
    action: Message = field(default_factory=dict)


@dataclass
class TaxonomyRequest(StepRequest):
    """A verified critical step to classify: the policy's rejected action and the verified chosen one."""

    rejected: Message = field(default_factory=dict)
    chosen: Message = field(default_factory=dict)


@dataclass
class Score:
    score: float | None  # None: unscored (the judge's answer did not parse); never a default value
    reasoning: str | None
    status: str = "ok"


@dataclass
class Category:
    category: str | None  # one of prompts.CATEGORIES; None: unclassified (never a default category)
    reasoning: str | None
    status: str = "ok"  # ok | unclassified


class Policy(Protocol):
    name: str
    records_calls: bool

    def act(self, requests: list[StepRequest], ctx=None) -> list[Message]: ...


class Expert(Protocol):
    name: str
    records_calls: bool
    prompt_version: str

    def propose(self, requests: list[StepRequest], k: int, ctx=None) -> list[list[Message]]: ...


class PRM(Protocol):
    name: str
    records_calls: bool
    prompt_version: str

    def score(self, requests: list[ScoreRequest], ctx=None) -> list[Score]: ...


class Judge(Protocol):
    name: str
    records_calls: bool
    prompt_version: str

    def classify(self, requests: list[TaxonomyRequest], ctx=None) -> list[Category]: ...


# `ctx` is a cso_lib.llm_models.LedgerContext for provider-backed models (ledger hits, journal). Every role
# has `records_calls` (whether the stage hands it a ctx) and, for expert, PRM and judge, `prompt_version`
# (the template its requests are built from, stored next to each result). The simulated models send no
# requests; with `sim.record_calls` they still write one ledger row per request they would send (the real
# prompt, tokens estimated from it, cost 0), so calls and tokens can be counted from the ledger.


# ---- the simulation world's models (SIMULATION: scripted, with known truth) -------------------------
class SimPolicy:
    records_calls = False  # the policy's calls are not recorded for the simulation

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

    prompt_version = prompts.EXPERT.version

    def __init__(self, world: SimWorld, quality: float, records_calls: bool = False) -> None:
        self.world, self.quality, self.records_calls = world, quality, records_calls
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
        if ctx is not None:
            from cso_lib.llm_models import record_sim_calls

            record_sim_calls(ctx, self.name, "expert", [
                (prompts.expert_messages(r.state, r.tools, k), prompts.expert_response_format(k, r.tools),
                 {"alternatives": [_as_answer(a) for a in alts]})
                for r, alts in zip(requests, out, strict=True)])
        return out


def _as_answer(action: Message) -> dict:
    """An action in the expert's answer format (what a model following the expert prompt would write)."""
    return {"thought": action.get("content") or "",
            "tool_calls": [{"name": n, "arguments": a} for n, a, _ in tool_calls(action)]}


class SimPRM:
    """Score = the truth's mean for the kind of action + Gaussian noise, clipped to [0, 1]."""

    prompt_version = prompts.PRM.version

    def __init__(self, world: SimWorld, noise: float, records_calls: bool = False) -> None:
        self.world, self.noise, self.records_calls = world, noise, records_calls
        self.name = f"sim-prm(seed={world.seed},noise={noise})"

    def score(self, requests: list[ScoreRequest], ctx=None) -> list[Score]:
        out = []
        for r in requests:
            kind = self.world.action_kind(self.world.task(r.task_id), r.state, r.action)
            rng = _rng("prm", self.world.seed, fingerprint(r.state), signature(r.action))
            value = min(1.0, max(0.0, PRM_MEAN[kind] + rng.gauss(0.0, self.noise)))
            out.append(Score(round(value, 4), f"[simulated PRM] action judged {kind}"))
        if ctx is not None:
            from cso_lib.llm_models import record_sim_calls

            record_sim_calls(ctx, self.name, "prm", [
                (prompts.prm_messages(r.state, r.tools, r.action), prompts.PRM.response_format(),
                 {"reasoning": s.reasoning, "score": s.score}) for r, s in zip(requests, out, strict=True)])
        return out


class SimJudge:
    """The simulation's error-taxonomy judge (SIMULATION: it reads the category off the world's truth).

    The world knows which scripted error the rejected action is (`SimWorld.error_kind`); its category is
    `ERROR_CATEGORY` of that kind. It knows only the simulation's tasks: a step of another environment is
    recorded as unclassified, never given a default.
    """

    prompt_version = prompts.TAXONOMY.version

    def __init__(self, world: SimWorld, records_calls: bool = False) -> None:
        self.world, self.records_calls = world, records_calls
        self.name = f"sim-judge(seed={world.seed})"

    def classify(self, requests: list[TaxonomyRequest], ctx=None) -> list[Category]:
        out = []
        for r in requests:
            if r.env != "sim":
                out.append(Category(None, f"the simulated judge knows only the simulation world's tasks, not env "
                                          f"{r.env!r}: configure a provider-backed `judge`", "unclassified"))
                continue
            kind = self.world.error_kind(self.world.task(r.task_id), r.state, r.rejected)
            if kind is None:
                out.append(Category("other", "[simulated judge] the world rates the rejected action correct"))
            else:
                out.append(Category(ERROR_CATEGORY[kind], f"[simulated judge] the world's error kind: {kind}"))
        if ctx is not None:
            from cso_lib.llm_models import record_sim_calls

            record_sim_calls(ctx, self.name, "judge", [
                (prompts.taxonomy_messages(r.state, r.tools, r.rejected, r.chosen), prompts.TAXONOMY.response_format(),
                 {"reasoning": c.reasoning, "category": c.category})
                for r, c in zip(requests, out, strict=True) if c.status == "ok"])
        return out


# ---- construction -----------------------------------------------------------------------------------
@dataclass
class Models:
    policy: Policy
    expert: Expert
    prm: PRM
    judge: Judge
    world: SimWorld | None


def build_models(cfg: Config) -> Models:
    """The configured models; `sim` roles are the simulation world's, the others provider-backed.

    The error-taxonomy judge is `cfg.judge`, or the PRM's model when that is not set.
    """
    from cso_lib.llm_models import LLMPRM, LLMExpert, LLMJudge, LLMPolicy

    roles = {"policy": cfg.policy, "expert": cfg.expert, "prm": cfg.prm, "judge": cfg.judge or cfg.prm}
    for role, mc in roles.items():
        if mc.provider in ("vllm", "transformers") and role != "policy":
            raise ConfigError(
                f"{role}.provider={mc.provider!r}: in-process engines serve the policy only; run the {role}'s "
                "model behind an OpenAI-compatible server (`vllm serve`) and use provider 'openai'"
            )
    world = SimWorld.from_config(cfg.sim)
    share = 1.0 / cfg.tasks_at_once
    rec = cfg.sim.record_calls
    sim = {role: mc.provider == "sim" for role, mc in roles.items()}
    return Models(
        policy=SimPolicy(world, cfg.sim.policy_error_rate, cfg.sim.policy_slip_rate)
        if sim["policy"] else local_policy(cfg.policy) or LLMPolicy(cfg.policy, share),
        expert=SimExpert(world, cfg.sim.expert_quality, rec) if sim["expert"] else LLMExpert(cfg.expert, share),
        prm=SimPRM(world, cfg.sim.prm_noise, rec) if sim["prm"] else LLMPRM(cfg.prm, share),
        judge=SimJudge(world, rec) if sim["judge"] else LLMJudge(roles["judge"], share),
        world=world,
    )


def local_policy(mc):
    """The in-process policy for provider `transformers` or `vllm`; None for the other providers."""
    if mc.provider == "transformers":
        from cso_lib.local_models import TransformersPolicy

        return TransformersPolicy(mc)
    if mc.provider == "vllm":
        from cso_lib.local_models import VLLMPolicy

        return VLLMPolicy(mc)
    return None


@lru_cache(maxsize=4)
def get_config(cfg_json: str) -> Config:
    return Config.model_validate(json.loads(cfg_json))


@lru_cache(maxsize=4)
def get_models(cfg_json: str) -> Models:
    """Models for a serialized config, built once per Python worker and reused across tasks."""
    return build_models(get_config(cfg_json))

