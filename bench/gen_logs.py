"""Seeded synthetic trajectory logs in the native format (schemas/trajectory.schema.json), for benchmarks.

Records are shaped like real tool-use agent logs: a system prompt of ~1.5 KB, ~1.5 KB of tool specs, a
query, and 4-16 steps, each an assistant message (a thought of a few sentences + one tool call with JSON
arguments) and an observation of a few hundred bytes; the last step calls `final_answer`. About 60% of
trajectories fail (outcome 0). Same arguments, same bytes.

    .venv/bin/python bench/gen_logs.py --trajectories 1000 --out bench/data/sample.jsonl
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import orjson

WORDS = (
    "the of and to in is for on that with as by at from this be are was or an it which has can not have "
    "search result page entity record field value source query answer report table year city person company "
    "product country population founded revenue author title release date price rating review version "
    "found matches listed shows contains returned indicates suggests confirms appears according data"
).split()
TOOLS = ["search", "lookup", "open_page", "calculator", "sql_query", "get_weather", "list_files", "read_file"]
SYSTEM_PROMPT = (
    "You are a careful research assistant with access to tools. Think step by step, call one tool at a "
    "time, check every fact against a source, and finish by calling final_answer with the answer only. "
) * 8
TOOL_SPECS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name.replace('_', ' ')}: " + " ".join(WORDS[i : i + 24]),
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string", "description": "What to look for."}},
                "required": ["query"],
            },
        },
    }
    for i, name in enumerate([*TOOLS, "final_answer"])
]


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choices(WORDS, k=n_words)).capitalize() + "."


def record(rng: random.Random, i: int) -> dict:
    """One synthetic native-format trajectory record."""
    n_steps = rng.randint(4, 16)
    steps = []
    for t in range(n_steps):
        last = t == n_steps - 1
        name = "final_answer" if last else rng.choice(TOOLS)
        args = {"answer": _text(rng, 4)} if last else {"query": _text(rng, rng.randint(3, 9)), "limit": 5}
        action = {
            "content": _text(rng, rng.randint(25, 55)),
            "tool_calls": [
                {
                    "id": f"call_{i}_{t}",
                    "type": "function",
                    "function": {"name": name, "arguments": orjson.dumps(args).decode()},
                }
            ],
        }
        steps.append({"action": action, "observation": None if last else _text(rng, rng.randint(50, 110))})
    return {
        "trajectory_id": f"synthetic/{i:08d}",
        "task_id": f"task-{i % 5000:05d}",
        "query": _text(rng, rng.randint(12, 30)),
        "ground_truth": _text(rng, 3),
        "outcome": 0 if rng.random() < 0.6 else 1,
        "policy_model": "synthetic-policy",
        "policy_version": "v1",
        "env": "synthetic",
        "system_prompt": SYSTEM_PROMPT,
        "tools": TOOL_SPECS,
        "steps": steps,
        "metadata": {"generator": "bench/gen_logs.py", "index": i},
    }


def generate(path: Path, n: int, seed: int) -> dict[str, int]:
    """Write n records as JSONL to path; counts of trajectories, steps and bytes."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_steps = 0
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        for i in range(n):
            rec = record(rng, i)
            n_steps += len(rec["steps"])
            f.write(orjson.dumps(rec) + b"\n")
    tmp.rename(path)
    return {"trajectories": n, "steps": n_steps, "bytes": path.stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/data/sample.jsonl"))
    args = parser.parse_args()
    print(generate(args.out, args.trajectories, args.seed))


if __name__ == "__main__":
    main()
