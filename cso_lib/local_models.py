"""In-process local models: a policy that runs a chat model with transformers, batched.

`policy.provider: transformers` with `policy.model: <a local model directory>` (for example the tiny model of
cso_lib.tiny_model) makes branch rollouts and evaluations generate with the model itself, in the executor: the
state is rendered with the model's own chat template and tools, every request of a call is generated in one
left-padded batch, and the completion is parsed back into an OpenAI-format assistant message. Tool calls are
read in the Hermes format that Qwen-family templates use (``<tool_call>{"name": ..., "arguments": {...}}
</tool_call>``). The loaded model is cached per Python worker, so Spark tasks that reuse a worker do not load
it again.

Params (`policy.params`): `max_tokens` (default 128), `temperature` (default 1.0; 0 means greedy), `top_p`,
`seed` (default 0), `batch_size` (default 16), `dtype` (default float32), `threads` (torch intra-op threads
on the CPU, default 1: one per Spark task slot).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from typing import Any

from cso_lib.config import ModelConfig
from cso_lib.messages import Message

_TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_ENGINES: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def parse_hermes(text: str, call_prefix: str = "call") -> Message:
    """An assistant message from generated text: the text outside ``<tool_call>`` blocks is the content,
    each block a tool call. A block whose JSON does not parse is kept as a call named by what can be read,
    with its raw arguments, so the environment answers it with its own error (as it would for any policy).

    >>> m = parse_hermes('I will look. <tool_call>{"name": "search", "arguments": {"query": "Ann"}}</tool_call>')
    >>> m["content"], m["tool_calls"][0]["function"]
    ('I will look.', {'name': 'search', 'arguments': '{"query": "Ann"}'})
    >>> parse_hermes("no call here")
    {'role': 'assistant', 'content': 'no call here'}
    """
    calls = []
    for i, block in enumerate(_TOOL_CALL.findall(text)):
        block = block.strip()
        try:
            obj = json.loads(block)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
            name = obj.get("name")
            args = obj.get("arguments", {})
            args_text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        except ValueError:
            found = re.search(r'"name"\s*:\s*"([^"]*)"', block)
            name, args_text = (found.group(1) if found else None), block
        calls.append({"id": f"{call_prefix}_{i}", "type": "function",
                      "function": {"name": name if isinstance(name, str) else "", "arguments": args_text}})
    content = _TOOL_CALL.sub("", text).strip()
    msg: Message = {"role": "assistant", "content": content}
    if calls:
        msg["tool_calls"] = calls
    return msg


def _seed(base: int, *parts: Any) -> int:
    h = hashlib.sha256(json.dumps([base, *parts], default=str).encode()).digest()
    return int.from_bytes(h[:4], "little")


class _HFEngine:
    def __init__(self, path: str, dtype: str, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            # Spark runs one task per core: more intra-op threads than that oversubscribe the executor and
            # spin (15.8 s vs 1.4 s for the same batch on a loaded 2-core machine).
            torch.set_num_threads(threads)
        self.tok = AutoTokenizer.from_pretrained(path)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(self.device)
        self.model.eval()
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 4096))


def hf_engine(path: str, dtype: str = "float32", threads: int = 1) -> _HFEngine:
    """The model at `path`, loaded once per Python worker."""
    key = ("hf", path, dtype)
    with _LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = _HFEngine(path, dtype, threads)
        return _ENGINES[key]


class TransformersPolicy:
    """The policy as a local transformers model (see the module docstring)."""

    records_calls = False

    def __init__(self, mc: ModelConfig) -> None:
        self.mc = mc
        p = dict(mc.params)
        self.max_tokens = int(p.get("max_tokens", 128))
        self.temperature = float(p.get("temperature", 1.0))
        self.top_p = float(p.get("top_p", 1.0))
        self.seed = int(p.get("seed", 0))
        self.batch_size = int(p.get("batch_size", 16))
        self.dtype = str(p.get("dtype", "float32"))
        self.threads = int(p.get("threads", 1))
        self.name = f"transformers:{mc.model}"

    @property
    def engine(self) -> _HFEngine:
        return hf_engine(self.mc.model, self.dtype, self.threads)

    def render(self, requests) -> list[str]:
        tok = self.engine.tok
        return [tok.apply_chat_template(r.state, tools=r.tools, add_generation_prompt=True, tokenize=False)
                for r in requests]

    def act(self, requests, ctx=None) -> list[Message]:
        out: list[Message | None] = [None] * len(requests)
        eng = self.engine
        texts = self.render(requests)
        limit = eng.max_len - self.max_tokens
        todo = []
        for i, text in enumerate(texts):
            n = len(eng.tok(text, add_special_tokens=False)["input_ids"])
            if n > limit:
                out[i] = {"role": "assistant",
                          "content": f"[policy call failed: prompt of {n} tokens exceeds the model's "
                                     f"{eng.max_len} positions minus max_tokens={self.max_tokens}]"}
            else:
                todo.append(i)
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start:start + self.batch_size]
            for i, text in zip(idx, self._generate([texts[i] for i in idx], [requests[i] for i in idx]),
                               strict=True):
                out[i] = parse_hermes(text, call_prefix=f"call_{requests[i].step_idx}")
        return out  # type: ignore[return-value]

    def _generate(self, texts: list[str], requests) -> list[str]:
        eng, torch = self.engine, self.engine.torch
        batch = eng.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(eng.device)
        # One seed per batch, derived from what is in it: the same batch of states gives the same actions.
        torch.manual_seed(_seed(self.seed, [(r.trajectory_id, r.step_idx, r.key) for r in requests]))
        kw: dict[str, Any] = {"max_new_tokens": self.max_tokens, "pad_token_id": eng.tok.pad_token_id,
                              "eos_token_id": eng.tok.eos_token_id}
        if self.temperature > 0:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kw.update(do_sample=False)
        with torch.no_grad():
            gen = eng.model.generate(**batch, **kw)
        new = gen[:, batch["input_ids"].shape[1]:]
        outs = []
        for row in new:
            text = eng.tok.decode(row, skip_special_tokens=False)
            for stop in (eng.tok.eos_token, eng.tok.pad_token):
                if stop and stop in text:
                    text = text.split(stop, 1)[0]
            outs.append(text)
        return outs
