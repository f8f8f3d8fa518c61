"""DPO on the verified pairs with TRL's DPOTrainer: full or LoRA fine-tuning, CPU, one GPU or many (accelerate).

The pairs are read exactly as written (`datasets.load_dataset("parquet", ...)`, TRL's conversational
preference format with a `tools` column), so TRL renders prompt, tools and tool calls with the model's own
chat template. The reference model is the previous round's policy: `train.model` itself unless
`train.ref_model` says otherwise. Before any training the pairs are tokenised as the trainer will and the
job refuses to run when more than `train.max_truncated_share` of them exceed `train.max_length`.

Output (`train.output_dir`): the trained policy as a complete model folder (a LoRA adapter is merged into its
base; the adapter itself is kept in `adapter/`), `train_metrics.json` (every logged step: loss,
rewards/margins, rewards/accuracies, ...) and `cso_train.json` (what was trained on what). Library code: no
Spark here, so the job runs under `accelerate launch` on GPU hosts without a Spark installation.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

from cso_lib.config import Config
from cso_lib.errors import TrainError

log = logging.getLogger("cso.train")

TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",)}


def output_dir(cfg: Config) -> str:
    return cfg.train.output_dir or cfg.storage.table(f"_models/round={cfg.round}")


def pair_files(cfg: Config) -> list[str]:
    """The Parquet files of the round's pairs (globs expanded for local paths)."""
    base = cfg.storage.pairs_path.rstrip("/") + ("" if cfg.cso.verify else "_unverified")  # as build_pairs writes
    patterns = cfg.train.pairs or [f"{base}/round={cfg.round}/*.parquet"]
    files: list[str] = []
    for p in patterns:
        files += [p] if "://" in p else sorted(glob.glob(p))
    if not files:
        raise TrainError(f"no pair files match {patterns!r}: run the pipeline (build_pairs) for round {cfg.round} "
                         "first, or set train.pairs")
    return files


def load_pairs(files: list[str]):
    """The pairs as a `datasets.Dataset`, with no conversion."""
    from datasets import load_dataset

    return load_dataset("parquet", data_files=files, split="train")


def check_tracker(report_to: str) -> list[str]:
    """transformers' report_to list; a clear error naming the package when the tracker is not installed."""
    if report_to == "none":
        return []
    if not any(importlib.util.find_spec(p) for p in TRACKER_PACKAGES[report_to]):
        raise TrainError(f"train.report_to={report_to!r} needs the {TRACKER_PACKAGES[report_to][0]!r} package: "
                         f"pip install {TRACKER_PACKAGES[report_to][0]} (tensorboard is in the `ml` extra), or set "
                         "train.report_to=none")
    return [report_to]


def _tools(example: dict) -> Any:
    tools = example.get("tools")
    return json.loads(tools) if isinstance(tools, str) else tools


def sequence_lengths(dataset, tokenizer) -> list[int]:
    """Per pair, the longer of prompt+chosen and prompt+rejected in tokens, rendered as DPOTrainer renders them
    (the tokenizer's chat template with the pair's tools)."""
    out = []
    for ex in dataset:
        n = 0
        for side in ("chosen", "rejected"):
            ids = tokenizer.apply_chat_template(ex["prompt"] + ex[side], tools=_tools(ex), tokenize=True,
                                                return_dict=True)["input_ids"]
            n = max(n, len(ids))
        out.append(n)
    return out


def truncation_report(lengths: list[int], max_length: int) -> dict[str, Any]:
    """How many pairs max_length would cut.

    >>> truncation_report([10, 20, 30, 40], 25)
    {'pairs': 4, 'max_length': 25, 'truncated': 2, 'share': 0.5, 'longest': 40, 'p50': 30}
    """
    longer = sum(1 for n in lengths if n > max_length)
    ordered = sorted(lengths)
    return {"pairs": len(lengths), "max_length": max_length, "truncated": longer,
            "share": round(longer / len(lengths), 4) if lengths else 0.0,
            "longest": ordered[-1] if ordered else 0, "p50": ordered[len(ordered) // 2] if ordered else 0}


def check_truncation(report: dict[str, Any], max_share: float) -> None:
    if report["share"] > max_share:
        raise TrainError(
            f"{report['truncated']} of {report['pairs']} pairs ({report['share']:.1%}) are longer than "
            f"train.max_length={report['max_length']} tokens (longest {report['longest']}); more than "
            f"train.max_truncated_share={max_share} would be truncated silently. Raise train.max_length or the "
            "share, or mine shorter states.")


def _bf16(setting: bool | None) -> bool:
    if setting is not None:
        return setting
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def dpo_config(cfg: Config, out: str, report_to: list[str]):
    from trl import DPOConfig

    t = cfg.train
    return DPOConfig(
        output_dir=out, beta=t.beta, learning_rate=t.learning_rate, num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1, per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        max_length=t.max_length, report_to=report_to or "none", logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no", save_steps=t.save_steps or 500, seed=t.seed,
        data_seed=t.seed, bf16=_bf16(t.bf16), gradient_checkpointing=t.gradient_checkpointing,
        run_name=f"cso-dpo-round{cfg.round}",
    )


def train(cfg: Config) -> dict[str, Any]:
    """Train round `cfg.round`'s policy on its pairs; returns the summary also written to cso_train.json."""
    if not cfg.train.model:
        raise TrainError("train.model is not set: give the policy to train (a model folder or hub id)")
    from transformers import AutoTokenizer, set_seed
    from trl import DPOTrainer

    t = cfg.train
    set_seed(t.seed)
    report_to = check_tracker(t.report_to)
    files = pair_files(cfg)
    dataset = load_pairs(files)
    if len(dataset) == 0:
        raise TrainError(f"no pairs in {files!r}")
    tokenizer = AutoTokenizer.from_pretrained(t.model)
    report = truncation_report(sequence_lengths(dataset, tokenizer), t.max_length)
    log.info("pairs: %s", report)
    check_truncation(report, t.max_truncated_share)

    out = output_dir(cfg)
    args = dpo_config(cfg, out, report_to)
    peft_config = None
    if t.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                                 target_modules=t.lora_target_modules, task_type="CAUSAL_LM")
    ref_model = None
    if t.ref_model and t.ref_model != t.model:
        from trl.trainer.utils import create_model_from_path

        ref_model = create_model_from_path(t.ref_model)
    # The model goes in by path: TRL loads it (and, with ref_model None, the reference as a second copy of the
    # same weights) after the accelerate / DeepSpeed state exists, which ZeRO-3 needs.
    trainer = DPOTrainer(model=t.model, ref_model=ref_model, args=args, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=peft_config)
    result = trainer.train()
    history = trainer.state.log_history
    summary = {
        "round": cfg.round, "model": t.model, "ref_model": t.ref_model or t.model, "output_dir": out,
        "pairs_files": files, "pairs": len(dataset), "truncation": report, "beta": t.beta, "lora": t.lora,
        "learning_rate": t.learning_rate, "steps": trainer.state.global_step, "train_loss": result.training_loss,
        "report_to": report_to,
    }
    if t.lora:
        trainer.save_model(f"{out}/adapter")
    else:
        trainer.save_model(out)
    if trainer.accelerator.is_main_process:
        if t.lora:
            merge_adapter(t.model, f"{out}/adapter", out)
        tokenizer.save_pretrained(out)
        Path(out, "train_metrics.json").write_text(json.dumps(history, indent=2) + "\n")
        Path(out, "cso_train.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    trainer.accelerator.wait_for_everyone()
    return {**summary, "history": history}


def merge_adapter(base: str, adapter_dir: str, out: str) -> None:
    """Base model + LoRA adapter -> one full model folder, so the next round loads it as policy and reference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    os.makedirs(out, exist_ok=True)
