"""The DPO and KTO trainers of trainer/preference.py, fed rows tokenised by the project's chat-template rule.

Contract: ``tokenize_preference(tokenizer, rows, stage, max_length)`` -> (TRL's tokenised columns: DPO
``prompt_ids``/``chosen_ids``/``rejected_ids``, KTO ``prompt_ids``/``completion_ids``/``label``; a TokenizedSet
counting truncated/dropped rows and tokens for metrics.json). Prompts and answers are split by trainer/data.py's
rule (message text is never parsed for special tokens); a row whose prompt alone fills max_length is dropped.
``build_preference_trainer(stage, base_path, start_adapter, tokenizer, rows, output_dir, config)`` ->
(DPOTrainer or KTOTrainer, divergence guard): the SFT run's model loading, Trainer arguments and callbacks
(trainer/sft_trainer.py), a fresh LoRA adapter or the `start_adapter` continued (TRL then keeps a frozen copy
as the reference), and TRL's own tokenising skipped for such rows.
"""

from __future__ import annotations

from pathlib import Path

from trainer.config import TrainConfig
from trainer.data import TokenizedSet, tokenize_example
from trainer.sft_trainer import load_model, lora_config, run_callbacks, trainer_args


def _split_ids(tokenizer, prompt: list[dict], answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids up to the assistant header, answer ids with the end-of-turn) by the project's rule."""
    tok = tokenize_example(tokenizer, list(prompt) + [{"role": "assistant", "content": answer}], 10**9, answers="last")
    cut = tok.completion_mask.index(1) if 1 in tok.completion_mask else len(tok.input_ids)
    return tok.input_ids[:cut], tok.input_ids[cut:]


def tokenize_preference(tokenizer, rows: list[dict], stage: str, max_length: int) -> tuple[list[dict], TokenizedSet]:
    """TRL's tokenised columns for DPO (prompt/chosen/rejected ids) or KTO (prompt/completion ids + label).

    A row whose prompt alone fills max_length is dropped (nothing of its answers would remain); the
    collator cuts the rest at max_length. The TokenizedSet counts what metrics.json reports.
    """
    out, truncated, dropped, tokens = [], 0, 0, 0
    for row in rows:
        if stage == "dpo":
            prompt_ids, chosen = _split_ids(tokenizer, row["prompt"], row["chosen"])
            _, rejected = _split_ids(tokenizer, row["prompt"], row["rejected"])
            entry = {"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected}
            longest = len(prompt_ids) + max(len(chosen), len(rejected))
        else:
            prompt_ids, completion = _split_ids(tokenizer, row["prompt"], row["answer"])
            entry = {"prompt_ids": prompt_ids, "completion_ids": completion, "label": row["label"] == "desirable"}
            longest = len(prompt_ids) + len(completion)
        if len(prompt_ids) >= max_length:
            dropped += 1
            continue
        truncated += longest > max_length
        tokens += min(longest, max_length)
        out.append(entry)
    return out, TokenizedSet([], truncated, dropped, tokens)


def build_preference_trainer(stage: str, base_path: str, start_adapter: Path | None, tokenizer, rows: list[dict],
                             output_dir: Path, config: TrainConfig, anchor_rows: list[dict] | None = None):
    """(DPOTrainer or KTOTrainer, divergence guard) on tokenised rows, with the SFT run's LoRA and callbacks.

    Given ``anchor_rows`` (tokenised general replay examples; trainer/preference.py passes them only when
    ``config.kl_weight > 0``) the trainer holds their answers to the starting weights (trainer/anchor.py,
    ``replay_anchored``), as the SFT stage does."""
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    cuda = torch.cuda.is_available()
    model = load_model(base_path, config, cuda)
    peft_config = None
    if start_adapter is not None:
        model = PeftModel.from_pretrained(model, str(start_adapter), is_trainable=True)
    else:
        peft_config = lora_config(config)
    args = dict(
        trainer_args(config, output_dir, cuda),
        eval_strategy="no",  # the best-epoch judge scores the SFT held-out and regression sets instead
        beta=config.preference_beta,
        learning_rate=config.preference_learning_rate or config.learning_rate,
    )
    trainer_class, config_class = (_PretokenizedDPO(DPOTrainer), DPOConfig) if stage == "dpo" else \
        (_PretokenizedKTO(KTOTrainer), KTOConfig)
    anchor = {}
    if anchor_rows:
        from trainer.anchor import replay_anchored

        trainer_class, anchor = replay_anchored(trainer_class), {"kl_weight": config.kl_weight,
                                                                 "anchor_rows": anchor_rows}
    callbacks = run_callbacks(model, config)
    trainer = trainer_class(model=model, args=config_class(**args), train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks, **anchor)
    return trainer, callbacks[0]


def _PretokenizedDPO(base):  # noqa: N802 - a class factory: TRL is imported only when training
    class PretokenizedDPOTrainer(base):
        """DPOTrainer fed rows tokenised by the project's chat-template rule (no re-tokenising)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" not in dataset.column_names:
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            return dataset

    return PretokenizedDPOTrainer


def _PretokenizedKTO(base):  # noqa: N802
    class PretokenizedKTOTrainer(base):
        """KTOTrainer fed rows tokenised by the project's rule; the KL completions are added as TRL does."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" not in dataset.column_names:
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if not self.calculate_KL:
                return dataset

            # KL estimate from mismatched (prompt, answer) pairs: answers rotated by one within each batch.
            def add_kl(batch):
                batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                return batch

            return dataset.map(add_kl, batched=True, batch_size=args.per_device_train_batch_size)

    return PretokenizedKTOTrainer
