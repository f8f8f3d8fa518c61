"""Training for the paper-table experiment: SFT (a plain torch loop) and DPO (TRL's DPOTrainer). CPU-sized.

SFT trains on assistant tokens only: each conversation is rendered whole with the model's chat template, and a
token is a target iff it lies inside an assistant message's span (its text and the closing `<|im_end|>`),
found by rendering the prefixes (the template renders a prefix with `add_generation_prompt=True` as the start
of the whole conversation). DPO hands TRL the pipeline's conversational records (`prompt`, `chosen`,
`rejected` message lists) as they are; TRL computes the loss on every completion token, so for ETO's
whole-trajectory pairs the tool results inside the completions count too (a known limit of TRL's DPOTrainer,
stated in cso_lib.baselines).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path

from cso_lib.messages import Message, to_struct


def _torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    return torch


def encode(tok, messages: list[Message], tools=None) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels (-100 outside assistant messages)."""
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") == "assistant":
            start = len(tok.apply_chat_template(messages[:i], tools=tools, add_generation_prompt=True, tokenize=False))
            end = len(tok.apply_chat_template(messages[: i + 1], tools=tools, tokenize=False))
            spans.append((start, end))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [t if any(s <= a < e for s, e in spans) else -100 for t, (a, _) in zip(ids, enc["offset_mapping"],
                                                                                    strict=True)]
    return ids, labels


def _assistant_loss(torch, model, ids, att, lab):
    """Mean next-token cross-entropy over the target tokens, computing the LM head only where a target is
    (the assistant tokens, about a third of a conversation: the head over a world-token vocabulary is most of
    a tiny model's compute). Equal to the model's own loss with `labels`."""
    hidden = model.model(input_ids=ids, attention_mask=att).last_hidden_state[:, :-1]
    target = lab[:, 1:]
    keep = target != -100
    return torch.nn.functional.cross_entropy(model.lm_head(hidden[keep]).float(), target[keep])


def sft(init_dir: str | Path, out_dir: str | Path, conversations: list[list[Message]], steps: int,
        batch_size: int = 16, lr: float = 1e-3, seed: int = 0, threads: int = 2, warmup: int = 20,
        log_every: int = 50, save_every: int = 0, schedule_steps: int | None = None,
        on_save: Callable[[int, Path], bool] | None = None) -> dict:
    """Fine-tune the causal LM at `init_dir` on `conversations` (assistant tokens only) for `steps`
    optimizer steps of `batch_size` conversations (cosine schedule); save to `out_dir` (and, with
    `save_every`, checkpoints to `out_dir`/step-<n>). The cosine decays over `schedule_steps` (default
    `steps`): training may stop before the schedule ends. `on_save(step, checkpoint_dir)` is called after each
    checkpoint; when it returns True, training stops there (early stopping: `out_dir` then holds the model of
    that step). Returns the losses and the steps trained."""
    torch = _torch(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(init_dir)
    model = AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
    model.train()
    data = [encode(tok, c) for c in conversations]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    horizon = max(1, schedule_steps or steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / horizon))))
    order: list[int] = []
    losses, t0 = [], time.time()
    for step in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(data)), len(data))
        batch, order = [data[i] for i in order[:batch_size]], order[batch_size:]
        n = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [tok.pad_token_id] * (n - len(i)) for i, _ in batch])
        lab = torch.tensor([la + [-100] * (n - len(la)) for _, la in batch])
        att = torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i, _ in batch])
        loss = _assistant_loss(torch, model, ids, att, lab)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"sft step {step}/{steps} loss {loss:.4f} ({time.time() - t0:.0f}s)", flush=True)
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            ckpt = Path(out_dir) / f"step-{step + 1}"
            model.save_pretrained(ckpt, safe_serialization=True)
            tok.save_pretrained(ckpt)
            if on_save is not None:
                model.eval()
                stop = on_save(step + 1, ckpt)
                model.train()
                if stop:
                    break
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return {"losses": losses, "seconds": time.time() - t0, "examples": len(data), "steps": len(losses)}


def _structs(messages) -> list[dict]:
    return [to_struct(dict(m)) for m in messages]


def dpo(init_dir: str | Path, out_dir: str | Path, pairs: list[dict], ref_dir: str | Path | None = None,
        beta: float = 0.5, epochs: float = 2.0, lr: float = 5e-5, batch_size: int = 8, seed: int = 0,
        threads: int = 2, max_length: int = 1024, sft_weight: float = 0.0) -> dict:
    """DPO with TRL from the model at `init_dir` (reference: `ref_dir`, default the same model) on
    conversational pairs {prompt, chosen, rejected}; save to `out_dir`. No pairs: the model is copied.
    `sft_weight` > 0 adds TRL's `sft` loss (NLL of the chosen completion) with that weight to the sigmoid DPO
    loss (`loss_type=["sigmoid", "sft"]`, as in RPO), which keeps DPO from lowering the chosen actions' likelihood
    along with the rejected ones."""
    torch = _torch(threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(init_dir)
    model = AutoModelForCausalLM.from_pretrained(init_dir, dtype=torch.float32)
    t0 = time.time()
    if not pairs:
        model.save_pretrained(out_dir, safe_serialization=True)
        tok.save_pretrained(out_dir)
        return {"pairs": 0, "seconds": 0.0, "losses": []}
    ref = AutoModelForCausalLM.from_pretrained(ref_dir or init_dir, dtype=torch.float32)
    ds = Dataset.from_list([{"prompt": _structs(p["prompt"]), "chosen": _structs(p["chosen"]),
                             "rejected": _structs(p["rejected"])} for p in pairs])
    args = DPOConfig(
        output_dir=str(Path(out_dir) / "_trl"), beta=beta, learning_rate=lr, num_train_epochs=epochs,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=1, seed=seed, max_length=max_length,
        logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
        lr_scheduler_type="cosine", warmup_steps=0.1, disable_tqdm=True, precompute_ref_log_probs=True,
        loss_type=["sigmoid", "sft"] if sft_weight > 0 else ["sigmoid"],
        loss_weights=[1.0, sft_weight] if sft_weight > 0 else None,
    )
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    out = trainer.train()
    trainer.model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    hist = [h for h in trainer.state.log_history if "loss" in h]
    return {"pairs": len(pairs), "seconds": time.time() - t0, "train_loss": out.training_loss,
            "log": hist}
