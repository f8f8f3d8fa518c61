"""Training for the paper-table experiment: SFT (a plain torch loop) and DPO (TRL's DPOTrainer). CPU-sized.

SFT trains on assistant tokens only: each conversation is rendered whole with the model's chat template, and a
token is a target iff it lies inside an assistant message's span (its text and the closing `<|im_end|>`),
found by rendering the prefixes (the template renders a prefix with `add_generation_prompt=True` as the start
of the whole conversation). DPO hands TRL the pipeline's conversational records (`prompt`, `chosen`,
`rejected` message lists) as they are and lets TRL tokenize them. TRL's DPOTrainer scores every completion
token; for ETO's whole-trajectory pairs that would count the tool results inside the completions, which the
policy does not produce (ETO itself scores the agent's actions only). With `assistant_only` (the default) the
log-probabilities are summed over assistant tokens only: `AssistantOnlyCollator` multiplies TRL's completion
mask by the assistant spans found as in SFT, after checking that its token ids are TRL's. A one-message
completion (a CSO, Step-DPO or no-verify pair) is all assistant, so for those pairs nothing changes.
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


def assistant_masks(tok, pair: dict) -> dict:
    """For a conversational pair: the token ids of prompt+chosen and prompt+rejected, and for each completion
    (cut where TRL cuts it: after the longest common prefix with the prompt rendered for generation) a 0/1 mask
    of its assistant tokens."""
    from trl.data_utils import common_prefix_length

    prompt_ids = tok.apply_chat_template(pair["prompt"], add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
    full = {side: encode(tok, list(pair["prompt"]) + list(pair[side])) for side in ("chosen", "rejected")}
    cut = min(common_prefix_length(prompt_ids, full[side][0]) for side in full)
    out = {}
    for side, (ids, labels) in full.items():
        out[f"{side}_full_ids"] = ids
        out[f"{side}_assistant"] = [int(lab != -100) for lab in labels[cut:]]
    return out


def assistant_only_collator(pad_token_id: int, max_length: int | None, truncation_mode: str):
    """TRL's preference collator whose completion mask keeps assistant tokens only (see the module doc). Needs the
    dataset columns of `assistant_masks`; a row whose ids differ from TRL's tokenization is an error."""
    import torch
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    class AssistantOnlyCollator(DataCollatorForPreference):
        def torch_call(self, examples):
            out = super().torch_call(examples)
            rows = []
            for side in ("chosen", "rejected"):
                for e in examples:
                    ids = e["prompt_ids"] + e[f"{side}_ids"]
                    if ids != e[f"{side}_full_ids"] or len(e[f"{side}_assistant"]) != len(e[f"{side}_ids"]):
                        raise ValueError(f"assistant mask of the {side} completion does not match TRL's tokens "
                                         f"({len(e[f'{side}_full_ids'])} ids vs {len(ids)})")
                    mask = [0] * len(e["prompt_ids"]) + list(e[f"{side}_assistant"])
                    if self.max_length is not None:
                        mask = mask[: self.max_length] if self.truncation_mode == "keep_start" \
                            else mask[-self.max_length:]
                    rows.append(mask + [0] * (out["completion_mask"].shape[1] - len(mask)))
            out["completion_mask"] = out["completion_mask"] * torch.tensor(rows, dtype=out["completion_mask"].dtype)
            return out

    return AssistantOnlyCollator(pad_token_id=pad_token_id, max_length=max_length, truncation_mode=truncation_mode)


def dpo(init_dir: str | Path, out_dir: str | Path, pairs: list[dict], ref_dir: str | Path | None = None,
        beta: float = 0.5, epochs: float = 2.0, lr: float = 5e-5, batch_size: int = 8, seed: int = 0,
        threads: int = 2, max_length: int = 1024, sft_weight: float = 0.0, assistant_only: bool = True) -> dict:
    """DPO with TRL from the model at `init_dir` (reference: `ref_dir`, default the same model) on
    conversational pairs {prompt, chosen, rejected}; save to `out_dir`. No pairs: the model is copied.
    `sft_weight` > 0 adds TRL's `sft` loss (NLL of the chosen completion) with that weight to the sigmoid DPO
    loss (`loss_type=["sigmoid", "sft"]`, as in RPO), which keeps DPO from lowering the chosen actions' likelihood
    along with the rejected ones. `assistant_only`: log-probabilities over assistant tokens only (module doc)."""
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
                             "rejected": _structs(p["rejected"]), **(assistant_masks(tok, p) if assistant_only else {})}
                            for p in pairs])
    args = DPOConfig(
        output_dir=str(Path(out_dir) / "_trl"), beta=beta, learning_rate=lr, num_train_epochs=epochs,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=1, seed=seed, max_length=max_length,
        logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
        lr_scheduler_type="cosine", warmup_steps=0.1, disable_tqdm=True, precompute_ref_log_probs=True,
        loss_type=["sigmoid", "sft"] if sft_weight > 0 else ["sigmoid"],
        loss_weights=[1.0, sft_weight] if sft_weight > 0 else None,
        remove_unused_columns=not assistant_only,  # the collator reads the mask columns
    )
    collator = assistant_only_collator(tok.pad_token_id, max_length, args.truncation_mode) if assistant_only else None
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok,
                         data_collator=collator)
    out = trainer.train()
    trainer.model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    hist = [h for h in trainer.state.log_history if "loss" in h]
    return {"pairs": len(pairs), "seconds": time.time() - t0, "train_loss": out.training_loss,
            "log": hist}
