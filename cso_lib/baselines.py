"""Baseline training sets built from the same tables as CSO's pairs, for A/B comparisons. Pure functions.

All records use TRL's conversational shapes, as `dpo_pairs/` does: preference records hold `prompt`,
`chosen` and `rejected` message lists (OpenAI chat messages, tool calls kept), SFT records a `messages`
list; the Spark stage (cso_lib.stages.baselines) adds provenance columns and writes Parquet.

- Step-DPO (`step_dpo_pairs`). Step-DPO (Lai et al., 2024, arXiv 2406.18629) trains DPO on single
  steps: prompt = the problem and the correct steps before the first wrong step, rejected = that wrong
  step, chosen = a corrected step sampled from the model and kept when its continuation reaches the
  right answer. As the baseline CSO is compared with (CSO's "PRM only, no verification" question, the
  issue's definition), the step is not localised by hand and nothing is rolled out: at EVERY step with a
  scored policy action and scored alternatives, chosen = the highest-scoring alternative (ties: lowest
  alt_idx), rejected = the policy's action, kept iff r_best > r_policy + margin. No gamma thresholds,
  no verification. With `cso.order=prm_first` alternatives exist only where r_policy < gamma_low; run
  with `cso.order=paper` to have alternatives at every step.
- ETO (`eto_pair`). ETO (Song et al., 2024, "Trial and Error", arXiv 2403.02502) pairs, for the same
  task, a successful trajectory (chosen) with a failed one (rejected) and trains DPO on whole
  trajectories. Prompt = the messages both conversations share at the start of their preambles (all of
  the preamble when identical; on tau-bench only the system prompt, as the simulated user words its first
  message differently in each trial); chosen / rejected = the rest of each conversation, tool and user
  messages included. A trainer should compute the loss on assistant tokens only (ETO conditions on
  observations); TRL's DPOTrainer does not mask them by itself, `cso_lib.experiment.train.dpo` does
  (`assistant_only_collator`). Successful conversations come from the
  logs (another trajectory of the same task with outcome 1) and from successful branch rollouts
  (`branch_conversation`: the failed trajectory's first t steps, then the expert's action and the
  policy's own continuation that reached the ground truth).
- RFT (`rft_record`): rejection-sampling fine-tuning data: every logged trajectory with outcome 1, as one
  SFT conversation.

>>> from cso_lib.messages import assistant, call
>>> pre = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
>>> bad, good = assistant("a", [call("c0", "f", {"x": 1})]), assistant("b", [call("c1", "f", {"x": 2})])
>>> steps = [(bad, [{"role": "tool", "tool_call_id": "c0", "content": "no"}])]
>>> scores = [{"step_idx": 0, "alt_idx": -1, "score": 0.3, "action": None},
...           {"step_idx": 0, "alt_idx": 0, "score": 0.8, "action": good}]
>>> [(p["step_idx"], p["alt_idx"], p["chosen"][0]["content"], p["rejected"][0]["content"])
...  for p in step_dpo_pairs(pre, steps, scores)]
[(0, 0, 'b', 'a')]
>>> fixed = branch_conversation(pre, steps, 0, [good, {"role": "tool", "tool_call_id": "c1", "content": "yes"}])
>>> pair = eto_pair(fixed, conversation(pre, steps))
>>> len(pair["prompt"]), [m["role"] for m in pair["chosen"]], pair["rejected"][0]["content"]
(2, ['assistant', 'tool'], 'a')
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cso_lib.messages import Message, Step, iter_states, split_messages


def conversation(preamble: list[Message], steps: list[Step]) -> list[Message]:
    """The whole trajectory as one message list."""
    out = list(preamble)
    for action, observations in steps:
        out.append(action)
        out.extend(observations)
    return out


def branch_conversation(
    preamble: list[Message], steps: list[Step], step_idx: int, continuation: list[Message]
) -> list[Message]:
    """A branch rollout as a whole conversation: s_t of the original trajectory, then the continuation
    (the expert's action a'_t first, then what the policy did from there)."""
    return conversation(preamble, steps[:step_idx]) + list(continuation)


def step_dpo_pairs(
    preamble: list[Message], steps: list[Step], scores: Iterable[dict[str, Any]], margin: float = 0.0
) -> list[dict[str, Any]]:
    """PRM-ranked step pairs of one trajectory (see the module docstring), in step order.

    `scores`: PRM scores of that trajectory, {step_idx, alt_idx, score, action}; alt_idx -1 is the
    policy's own action (its `action` is ignored: the logged one is used), >= 0 an alternative whose
    `action` is the expert's message. Unscored rows (score None) are skipped.
    """
    policy: dict[int, float] = {}
    best: dict[int, tuple[float, int, Message]] = {}
    for row in scores:
        t, j, score = row["step_idx"], row["alt_idx"], row["score"]
        if score is None:
            continue
        if j < 0:
            policy[t] = score
        elif t not in best or (score, -j) > (best[t][0], -best[t][1]):
            best[t] = (score, j, row["action"])
    picked = {t for t in best if t in policy and best[t][0] > policy[t] + margin}
    out = []
    for t, state in iter_states(preamble, steps):
        if t in picked:
            r_expert, j, action = best[t]
            out.append(
                {
                    "step_idx": t,
                    "alt_idx": j,
                    "r_policy": policy[t],
                    "r_expert": r_expert,
                    "prompt": list(state),
                    "chosen": [action],
                    "rejected": [steps[t][0]],
                }
            )
    return out


def _preamble_len(messages: list[Message]) -> int:
    return len(split_messages(messages)[0])


def eto_pair(chosen: list[Message], rejected: list[Message]) -> dict[str, list[Message]] | None:
    """A trajectory-level pair: prompt = the leading preamble messages both share, chosen / rejected = the
    rest of each. None when they share no leading message (no common prompt) or are identical."""
    limit = min(_preamble_len(chosen), _preamble_len(rejected))
    n = 0
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    if n == 0 or chosen == rejected:
        return None
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def rft_record(preamble: list[Message], steps: list[Step]) -> dict[str, list[Message]]:
    """A successful trajectory as one TRL conversational SFT record.

    >>> rft_record([{"role": "user", "content": "q"}], [({"role": "assistant", "content": "a"}, [])])
    {'messages': [{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a'}]}
    """
    return {"messages": conversation(preamble, steps)}
