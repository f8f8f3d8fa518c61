"""Tiny local chat models for tests, benchmarks and the embedded default: no model hub needed.

`ensure_tiny_model(path)` writes a directory that transformers, TRL and vLLM all load as a model id: a
byte-level BPE tokenizer trained here with the `tokenizers` library on a seeded corpus (the simulation world's
texts, JSON and tool-call syntax), a chat template that renders system prompts, tools, assistant tool calls
(Hermes style: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, so vLLM's ``hermes`` tool parser
reads them) and tool results, and a Qwen2 decoder with random weights. Same seed, same files.

The weights are random: the model produces fluent-looking noise until something trains it. That is what the
plumbing tests need (real engines, real tokenisation, real generation); quality experiments train it first.

`TinySpec(world_tokens=(seed, n_entities))` builds the tokenizer of the paper-table experiment (issue 8): every
entity id, name, terminal value and attribute name of that simulation world is ONE token (an added token), and
the BPE also learns the experiment's compact prompts and tool-call syntax. Copying an id or a value is then one
token, so what the policy can get wrong are decisions (which tool, which attribute, which entity, which value to
carry), not the digits of a long copy.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, TOOL_CALL_START, TOOL_CALL_END, "<tool_response>", "</tool_response>"]

# Qwen2-style ChatML with Hermes tool calls. Rendered by transformers with trim_blocks and lstrip_blocks.
# A conversation rendered whole starts with the same text as its prefix rendered with
# add_generation_prompt=True (TRL relies on that to split prompt from completion).
NL = "{{ '\\n' }}"
CHAT_TEMPLATE = (
    "{% if tools %}"
    "<|im_start|>system" + NL +
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}" + NL + NL + "{% endif %}"
    "# Tools" + NL + "<tools>" + NL +
    "{% for tool in tools %}{{ tool | tojson }}" + NL + "{% endfor %}"
    "</tools>" + NL + "To call a tool, reply with <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>."
    "<|im_end|>" + NL +
    "{% elif messages[0].role == 'system' %}"
    "<|im_start|>system" + NL + "{{ messages[0].content }}<|im_end|>" + NL +
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'system' %}"
    "{% if not loop.first %}<|im_start|>system" + NL + "{{ message.content }}<|im_end|>" + NL + "{% endif %}"
    "{% elif message.role == 'assistant' %}"
    "<|im_start|>assistant" + NL +
    "{% if message.content %}{{ message.content }}{% endif %}"
    "{% if message.tool_calls %}{% for tc in message.tool_calls %}"
    "{% set f = tc.function if tc.function is defined else tc %}"
    "<tool_call>{\"name\": \"{{ f.name }}\", \"arguments\": "
    "{% if f.arguments is string %}{{ f.arguments }}{% else %}{{ f.arguments | tojson }}{% endif %}"
    "}</tool_call>"
    "{% endfor %}{% endif %}"
    "<|im_end|>" + NL +
    "{% elif message.role == 'tool' %}"
    "<|im_start|>tool" + NL + "<tool_response>{{ message.content }}</tool_response><|im_end|>" + NL +
    "{% else %}"
    "<|im_start|>{{ message.role }}" + NL + "{{ message.content }}<|im_end|>" + NL +
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant" + NL + "{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Shape of the tiny model. head_dim = hidden_size / num_attention_heads = 64: vLLM's CPU attention
    supports it (16 does not)."""

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    max_position_embeddings: int = 8192
    seed: int = 0
    # (seed, n_entities) of a simulation world whose ids, names, values and attributes become single tokens
    world_tokens: tuple[int, int] | None = None
    initializer_range: float | None = None  # std of the random init (None: Qwen2's 0.02)


def _corpus(seed: int, n_tasks: int = 300) -> list[str]:
    """Seeded training text for the tokenizer: the sim world's tasks and tool traffic, plus JSON syntax."""
    from cso_lib.sim.world import SYSTEM_PROMPT, TOOLS, SimWorld

    world = SimWorld(seed=seed, n_tasks=n_tasks)
    rng = random.Random(seed)
    lines: list[str] = [SYSTEM_PROMPT, json.dumps(TOOLS)]
    for tid in world.task_ids():
        task = world.task(tid)
        lines.append(task.query)
        lines.append(" ".join(task.chain))
    for eid, row in list(world.kb.items())[:400]:
        lines.append(f"{eid}: {row['name']} ({row['type']}) " + json.dumps(row))
    words = "the a an of to and in is for on with as by at from answer search lookup compute tool result".split()
    for _ in range(2000):
        lines.append(" ".join(rng.choice(words) for _ in range(12)))
        lines.append(json.dumps({"name": rng.choice(words), "arguments": {"query": rng.random(), "k": rng.randint(0, 99)}}))
    return lines


def world_vocabulary(seed: int, n_entities: int) -> list[str]:
    """The strings of a simulation world that `TinySpec.world_tokens` makes single tokens: entity ids,
    names, terminal values and attribute names (sorted, so the token ids are a function of the world)."""
    from cso_lib.sim.world import RELATIONS, SimWorld

    kb = SimWorld(seed=seed, n_tasks=1, n_entities=n_entities).kb
    words = set(kb) | {row["name"] for row in kb.values()} | {a for attrs in RELATIONS.values() for a in attrs}
    words |= {row[a] for row in kb.values() for a, target in RELATIONS[row["type"]].items() if target is None}
    return sorted(words)


def _experiment_corpus(seed: int, n_entities: int, n_tasks: int = 200) -> list[str]:
    """The paper-table experiment's texts (compact prompts, solver actions, observations, tool-call JSON and
    the chat template's role names), for the BPE part of a `world_tokens` tokenizer."""
    from cso_lib.experiment.tasks import demonstration
    from cso_lib.sim.world import SimWorld

    world = SimWorld(seed=seed, n_tasks=n_tasks, n_entities=n_entities)
    lines = ["system", "user", "assistant", "tool", "<|im_start|>assistant\n", "<|im_start|>tool\n"]
    for tid in world.task_ids():
        for m in demonstration(world, tid):
            lines.append(m.get("content") or "")
            for c in m.get("tool_calls") or []:  # as the chat template renders a call
                lines.append(f'{{"name": "{c["function"]["name"]}", "arguments": {c["function"]["arguments"]}}}')
    return lines


def build_tokenizer(spec: TinySpec = TinySpec()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    corpus = _corpus(spec.seed)
    if spec.world_tokens is not None:
        corpus += _experiment_corpus(*spec.world_tokens) * 5
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token=IM_END, pad_token=PAD, unk_token=None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD, IM_END)],
    )
    if spec.world_tokens is not None:
        from tokenizers import AddedToken

        fast.add_tokens([AddedToken(w, normalized=False) for w in world_vocabulary(*spec.world_tokens)])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = spec.max_position_embeddings
    return fast


def build_model(tokenizer, spec: TinySpec = TinySpec()):
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(spec.seed)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, torch_dtype="float32",
        **({"initializer_range": spec.initializer_range} if spec.initializer_range is not None else {}),
    )
    model = Qwen2ForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=True,
        temperature=1.0, max_new_tokens=64,
    )
    return model


def ensure_tiny_model(path: str | os.PathLike, spec: TinySpec = TinySpec()) -> Path:
    """Build the tiny model into `path` unless a build with the same spec is already there."""
    path = Path(path)
    marker = path / "cso_tiny_spec.json"
    # unset options are left out, so adding an option does not invalidate the models already built
    want = json.dumps({k: v for k, v in asdict(spec).items() if v is not None}, sort_keys=True)
    if marker.exists() and marker.read_text() == want:
        return path
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec)
    model = build_model(tokenizer, spec)
    tokenizer.save_pretrained(path)
    model.save_pretrained(path, safe_serialization=True)
    marker.write_text(want)
    return path


def default_tiny_model_dir() -> Path:
    """Where the embedded default keeps its tiny model: `<checkout>/.cache/models/tiny-qwen2`."""
    root = Path(os.environ.get("CSO_CACHE_DIR", Path(__file__).resolve().parents[1] / ".cache"))
    return root / "models" / "tiny-qwen2"
