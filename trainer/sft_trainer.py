"""The model and the Trainer of a run: base weights, LoRA, Trainer arguments, the run's callbacks.

Contract: ``build_trainer(base_path, tokenizer, train_rows, eval_rows, output_dir, config)`` returns
``(SFTTrainer, divergence guard)`` for rows tokenised by trainer/data.py (``{"input_ids", "labels"}``);
trainer/train.py drives it. The pieces are shared with the preference trainers (trainer/preference_trainer.py):
``load_model`` (fp32 on a CPU; bf16, or 4-bit QLoRA, one whole model per GPU), ``lora_config``,
``trainer_args`` (the TrainingArguments every objective sets the same way) and ``run_callbacks`` (the
NaN/explosion/collapse guard first, then the NaN injector of ``inject_nan_at_step``). Nothing here imports
torch, transformers, TRL or PEFT at module level.
"""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path

from trainer.config import TrainConfig
from trainer.run_setup import TrainingError

log = logging.getLogger(__name__)


def build_trainer(base_path: str, tokenizer, train_rows: list, eval_rows: list, output_dir: Path,
                  config: TrainConfig):
    """(SFTTrainer, divergence guard) for tokenised rows ({"input_ids", "labels"}); train() drives it."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    model = load_model(base_path, config, cuda)
    if config.init_adapter:  # continue an adapter's weights (the refit continues the judged variant)
        from peft import PeftModel

        model, peft_config = PeftModel.from_pretrained(model, config.init_adapter, is_trainable=True), None
    else:
        peft_config = lora_config(config)
    sft_kwargs = dict(
        trainer_args(config, output_dir, cuda),
        eval_strategy="steps" if eval_rows else "no",
        eval_steps=config.save_steps,
        packing=False,
        neftune_noise_alpha=config.neftune_noise_alpha or None,
    )
    if cuda and config.cuda_precision != "fp32":
        _apply_cuda_fast(sft_kwargs, model, config, train_rows)
    callbacks = run_callbacks(model, config)
    trainer_class, anchor = SFTTrainer, {}
    if config.kl_weight > 0:
        from trainer.anchor import anchored

        trainer_class, anchor = anchored(SFTTrainer), {"kl_weight": config.kl_weight}
    trainer = trainer_class(
        model=model,
        args=SFTConfig(**sft_kwargs),
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
        **anchor,
    )
    if config.question_dropout > 0:
        from trainer.augment import WordDropoutCollator
        from trainer.data import keep_columns

        keep_columns(trainer, "words")
        trainer.data_collator = WordDropoutCollator(trainer.data_collator, config.question_dropout, config.seed,
                                                    lambda: trainer.state.global_step)
    return trainer, callbacks[0]


def lora_config(config: TrainConfig):
    """A fresh LoRA adapter as the config says (rank, alpha, dropout, target modules, DoRA or not)."""
    from peft import LoraConfig

    return LoraConfig(r=config.lora_rank, lora_alpha=config.alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.target_modules_value(), use_dora=config.use_dora, bias="none",
                      task_type="CAUSAL_LM")


def trainer_args(config: TrainConfig, output_dir: Path, cuda: bool) -> dict:
    """The Trainer arguments every objective sets alike (SFTConfig, DPOConfig and KTOConfig all take them)."""
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        logging_nan_inf_filter=False,  # the default hides NaN losses from the log, and so from the guard
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        report_to="none",
        max_length=config.max_length,
        gradient_checkpointing=config.gradient_checkpointing,
        bf16=cuda and config.cuda_precision != "fp32",
        use_cpu=not cuda,
        ddp_find_unused_parameters=False,  # LoRA: every adapter gets a gradient; skip DDP's graph walk
        dataloader_num_workers=0,
    )


def run_callbacks(model, config: TrainConfig) -> list:
    """[divergence guard, (NaN injector when config.inject_nan_at_step)]: the guard is always first."""
    guard_class, injector_class = _callbacks()
    callbacks = [guard_class(config.loss_explode_factor, getattr(model.config, "vocab_size", None),
                             config.loss_explode_window)]
    if config.inject_nan_at_step:
        callbacks.append(injector_class(model, config.inject_nan_at_step))
    return callbacks


def _callbacks():
    """The run's TrainerCallback classes (defined here so importing this module does not load transformers)."""
    from transformers import TrainerCallback

    class _DivergenceGuard(TrainerCallback):
        """Stops a run whose loss turns NaN/inf, collapses to chance level, or stays exploded; remembers why.

        Non-finite values and chance level stop the run at the step they appear. "Exploded" is judged on the
        running median (the lower middle value) of the last ``window`` logged losses: a single noisy batch
        cannot trip it, a loss that stays high trips it once more than half of the window is above the limit.
        """

        def __init__(self, explode_factor: float, vocab_size: int | None, window: int):
            self.explode_factor, self.window = explode_factor, window
            # Uniform guessing over the vocabulary scores ln(V) per token; a pretrained model is far below
            # that, so reaching 90% of it means the weights were wrecked (what lr=1e9 does: loss 10.8 = ln 49152).
            self.chance_loss = math.log(vocab_size) if vocab_size else math.inf
            self.first_loss: float | None = None
            self.recent: list[float] = []
            self.reason: str | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            # On resume the reference is the run's first logged loss, not the first after the restart, and the
            # window carries on from the losses logged before the checkpoint.
            losses = [float(h["loss"]) for h in state.log_history if "loss" in h]
            self.first_loss = losses[0] if losses else None
            self.recent = losses[-self.window:]

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs or self.reason:
                return
            loss, grad_norm, step = float(logs["loss"]), logs.get("grad_norm"), state.global_step
            if self.first_loss is None:
                self.first_loss = loss
            self.recent = (self.recent + [loss])[-self.window:]
            # Single small batches are noisy (an easy first batch can score 0.3): the reference is >= 1 nat.
            reference = max(self.first_loss, 1.0)
            typical = statistics.median_low(self.recent)
            if not math.isfinite(loss):
                self.reason = f"loss became {loss} at step {step}"
            elif grad_norm is not None and not math.isfinite(float(grad_norm)):
                self.reason = f"gradient norm became {grad_norm} at step {step}"
            elif loss >= 0.9 * self.chance_loss:
                self.reason = (f"loss collapsed to {loss:.4g} at step {step}, the level of guessing uniformly "
                               f"over the vocabulary ({self.chance_loss:.4g}): the weights diverged")
            elif typical > self.explode_factor * reference:
                self.reason = (f"loss exploded: the median of the last {len(self.recent)} logged losses is "
                               f"{typical:.4g} at step {step} (more than {self.explode_factor:g} x the reference "
                               f"{reference:.4g}; last losses {', '.join(f'{v:.3g}' for v in self.recent)})")
            elif loss > self.explode_factor * reference:
                log.warning("step %s: loss %.4g is over %g x the reference %.4g; one batch is not a divergence, "
                            "the run goes on unless the loss stays there", step, loss, self.explode_factor,
                            reference)
            if self.reason:
                log.error("stopping: %s", self.reason)
                # Stop now, and keep this step's weights out of any checkpoint or evaluation (a diverged run is
                # never resumed, so a checkpoint saved inside the window is never used).
                control.should_training_stop = True
                control.should_save = False
                control.should_evaluate = False

    class _NanInjector(TrainerCallback):
        """Testing hook (trainer.inject_nan_at_step): NaN embeddings from that step on, through the real path."""

        def __init__(self, model, step: int):
            self.step, self.active = step, False
            model.get_input_embeddings().register_forward_hook(
                lambda module, inputs, output: output * float("nan") if self.active else None)

        def on_step_begin(self, args, state, control, **kwargs):
            self.active = state.global_step + 1 >= self.step

    return _DivergenceGuard, _NanInjector


def load_model(base_path: str, config: TrainConfig, cuda: bool):
    import torch
    from transformers import AutoModelForCausalLM

    if not cuda:
        return AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    from accelerate import PartialState

    device_map = {"": PartialState().local_process_index}  # one whole model per GPU (data parallel)
    if config.cuda_precision == "qlora":
        try:
            from transformers import BitsAndBytesConfig

            quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_compute_dtype=torch.bfloat16,
                                              bnb_4bit_use_double_quant=True)
            return AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16, device_map=device_map,
                                                        quantization_config=quantization)
        except ImportError as exc:
            raise TrainingError(
                f"QLoRA needs the bitsandbytes package ({exc}); install it or set trainer.cuda_precision = 'bf16'"
            ) from exc
    dtype = torch.float32 if config.cuda_precision == "fp32" else torch.bfloat16
    return AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, device_map=device_map)


def _apply_cuda_fast(sft_kwargs: dict, model, config: TrainConfig, train_rows: list) -> None:
    """The GPU fast path (padding-free batches, fused kernels) lives in trainer/cuda_fast.py when present."""
    try:
        from trainer import cuda_fast
    except ImportError:
        return
    cuda_fast.apply(sft_kwargs, model, config, train_rows=train_rows)
