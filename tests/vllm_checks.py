"""vLLM checks run in a subprocess under the vllm overlay env (tests/test_vllm.py starts it).

    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python tests/vllm_checks.py .cache/models/tiny-qwen2

Prints one JSON object with what tests/test_vllm.py asserts. One engine for all checks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cso_lib.config import ModelConfig  # noqa: E402
from cso_lib.envs import SimEnvironment  # noqa: E402
from cso_lib.local_models import VLLMPolicy, vllm_engine  # noqa: E402
from cso_lib.models import StepRequest  # noqa: E402
from cso_lib.rollout import Branch, run_branches  # noqa: E402
from cso_lib.sim.world import SYSTEM_PROMPT, TOOLS, SimWorld  # noqa: E402


def main(model_dir: str) -> dict:
    world = SimWorld(seed=5, n_tasks=12, n_entities=60)
    mc = ModelConfig(provider="vllm", model=model_dir, params={
        "max_tokens": 16, "temperature": 1.0, "seed": 3, "dtype": "float32", "max_model_len": 4096,
        "enforce_eager": True, "kv_cache_memory_bytes": 256 * 2**20})
    policy = VLLMPolicy(mc)
    batches: list[int] = []
    act = policy.act

    def counting_act(requests, ctx=None):
        batches.append(len(requests))
        return act(requests, ctx)

    policy.act = counting_act  # type: ignore[method-assign]
    branches = []
    for i, tid in enumerate(world.task_ids()[:6]):
        task = world.task(tid)
        state = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": task.query}]
        alt = world.solver_action(task, state, "call_0")
        branches.append(Branch(f"t{i}", tid, "sim", 0, 0, 0, state, alt, TOOLS))
    run_branches(branches, policy, {"sim": SimEnvironment(world)}, budget=3)
    out = {
        "batches": batches, "generate_calls": policy.generate_calls,
        "branches": [{"status": b.status, "steps_after_branch": b.steps_after_branch,
                      "roles": [m["role"] for m in b.continuation],
                      "actions": [m for m in b.continuation if m["role"] == "assistant"][1:]} for b in branches],
    }
    policy.act = act  # type: ignore[method-assign]
    reqs = [StepRequest(f"t{i}", b.task_id, "sim", 1, b.state, TOOLS, key=f"k{i}") for i, b in enumerate(branches)]
    alone = policy.act(reqs[:1])[0]
    together = policy.act(reqs)
    again = policy.act(reqs)
    out["seed_independent_of_batch"] = alone == together[0]
    out["same_seed_same_actions"] = together == again
    out["distinct_keys_distinct_samples"] = len({json.dumps(a, sort_keys=True) for a in together}) > 1
    out["prompt_has_tools"] = "# Tools" in policy.render(reqs[:1])[0] and "lookup" in policy.render(reqs[:1])[0]
    out["one_engine"] = vllm_engine(mc.model, **policy.engine_kw) is policy.engine
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1])), flush=True)
