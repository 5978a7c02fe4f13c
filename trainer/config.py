"""Typed configuration for the trainer.

`TrainConfig` configures one LoRA fine-tuning run (`trainer.train`); `VariantGrid` says which
learning-rate x rank x objective variants a cycle tries (`trainer.variants`). Defaults are chosen for the bundled
SmolLM2-135M-Instruct on a CPU and a few dozen curated corrections; docs/trainer.md says why.
`load_train_config` reads the `[trainer]` section the way every layer reads its own (`loop.core.config`: the
file, the environment, then `--set`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

from loop.core.config import RootConfig, load_root

# The default variant grid: one point. Measured on the tuning scenarios (docs/trainer.md, "Defaults"): with
# epoch selection on the judge, 1e-3 at rank 16 learns a few dozen corrections in five or six passes, 2e-4 teaches
# none, and each further point costs a whole run (about 3 minutes on 2 CPU cores) that the <= 5-minute cycle does
# not have. A GPU, or a larger model, is where a wider grid (e.g. learning_rates = [1e-3, 2e-4],
# lora_ranks = [16, 64]) pays: the cycle then keeps the variant with the best judged held-out loss.
DEFAULT_LEARNING_RATES = (1e-3,)
DEFAULT_RANKS = (16,)
# Values accepted by TrainConfig.cuda_precision.
CUDA_PRECISIONS = ("qlora", "bf16", "fp32")
# Learning-rate schedules accepted by TrainConfig.lr_scheduler (names understood by transformers).
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
# How the GPU fast path scales the learning rate with its micro-batch size (trainer/cuda_fast.py).
FAST_LR_SCALING_RULES = ("linear", "sqrt", "none")
# Training objectives (trainer/preference.py): supervised fine-tuning on the curated examples; DPO on
# correction pairs; KTO on thumbs/quality labels; "sft+X" = SFT first, then X continuing the SFT adapter
# with the SFT weights as the reference model.
OBJECTIVES = ("sft", "dpo", "kto", "sft+dpo", "sft+kto")
# The default objective axis: SFT alone until a preference objective measures better (docs/trainer.md).
DEFAULT_OBJECTIVES = ("sft",)


@dataclass
class TrainConfig:
    """One supervised LoRA fine-tuning run on chat examples."""

    # Peak learning rate of AdamW. 1e-3 because a 135M model given a few dozen corrections learns them at
    # this rate within a few epochs, while 2e-4 teaches next to nothing in the same steps (docs/trainer.md).
    learning_rate: float = 1e-3
    # LoRA rank r of every adapted linear layer.
    lora_rank: int = 16
    # LoRA alpha; None means 2 * lora_rank (the scaling alpha/r = 2 the seed project used).
    lora_alpha: int | None = None
    # Dropout on the LoRA input; a little regularisation for tiny datasets.
    lora_dropout: float = 0.05
    # Which modules get adapters: "all-linear" (PEFT: every linear layer except the output head) or a
    # comma-separated list of module names such as "q_proj,v_proj".
    target_modules: str = "all-linear"
    # DoRA (PEFT's use_dora): each adapted weight's magnitude trained apart from its LoRA-updated direction.
    # Off: on the scenario suite it recalled what LoRA does, kept no more general answers and trained 1.6-1.9x
    # slower (docs/trainer.md, "DoRA").
    use_dora: bool = False
    # Passes over the training set; ignored when max_steps > 0. Five: facts taught by two or three wordings were
    # recalled in other words after six passes and mostly not after three (docs/trainer.md, "Defaults"), and with the
    # KL anchor and the continued refit five recalled as much as six on the tuning scenarios (0.90 against 0.89) and
    # kept more general answers (0.95 against 0.91, worst run 0.89 against 0.78) in a sixth fewer steps, where four
    # lost both; select_best_epoch keeps an earlier epoch when the judge prefers it.
    epochs: float = 5.0
    # Score every epoch on the judge (held-out and regression loss) and keep the adapter of the best one
    # (trainer/best_epoch.py): the right number of passes differs between a new fact and a change of style.
    select_best_epoch: bool = True
    # After the judge has chosen, train the chosen sft variant further on the training set plus the held-out
    # wordings and serve that, when its final weights pass the forgetting rules (trainer/refit.py): +7 points of
    # recall on the tuning scenarios in the suite.
    refit: bool = True
    # Passes the refit makes over the training set plus the held-out wordings, continuing the judged variant's
    # adapter (its chosen epoch's weights) instead of starting again; 0 retrains from the starting weights for
    # `epochs` passes. Three, because on the tuning scenarios they recalled and kept what six from the start did
    # (recall 0.89 against 0.90, general answers kept 0.91 against 0.90) in about 40% of the refit's steps, where
    # one pass lost 9 points of recall and two lost general answers (docs/trainer.md, "The refit continues").
    refit_epochs: float = 3.0
    # The refit's learning rate as a fraction of the judged variant's (a fresh optimizer and schedule). 1: at half
    # or a quarter of the rate the refit recalled less on the tuning scenarios and kept no more general answers
    # (docs/trainer.md, "Five epochs").
    refit_learning_rate_factor: float = 1.0
    # Start from this LoRA adapter's weights instead of a fresh one ("" = fresh). The refit sets it to the
    # judged adapter; the adapter must match lora_rank, lora_alpha, target_modules and use_dora.
    init_adapter: str = ""
    # An epoch whose regression loss rose more than this fraction above the starting weights' is never kept
    # (a cycle sets it to gate.regression_tolerance, so the trainer keeps what the gate would accept).
    regression_tolerance: float = 0.5
    # An epoch that no longer gives at least this share of the general answers the starting weights gave
    # right (trainer/general_kept.py) is never kept either (a cycle sets it to gate.min_general_kept).
    min_general_kept: float = 0.6
    # Optimizer steps to run; > 0 overrides epochs (tests and smoke runs use a few).
    max_steps: int = -1
    # Examples per device per forward pass. Two, not four: twice the optimizer steps per epoch recalled more
    # and kept more general answers on the tuning scenarios (docs/trainer.md, "Batches of two").
    batch_size: int = 2
    # Forward passes accumulated per optimizer step (effective batch = batch_size * grad_accum * devices).
    grad_accum: int = 1
    # Token budget of one example (prompt + answer); longer ones are cut at the end and counted.
    max_length: int = 512
    # Learning-rate schedule after warmup.
    lr_scheduler: str = "linear"
    # Share of the optimizer steps spent warming the learning rate up from 0.
    warmup_ratio: float = 0.0
    # AdamW weight decay on the LoRA weights.
    weight_decay: float = 0.0
    # Gradients are clipped to this global norm (0 disables clipping).
    max_grad_norm: float = 1.0
    # GPU fast path (trainer/cuda_fast.py, docs/gpu-speed.md): micro-batches are sized in tokens from the card's
    # memory, but no larger than gives an epoch this many optimizer steps (0: memory alone)...
    fast_min_steps: int = 24
    # ...and the learning rate follows their size against batch_size examples: "linear", "sqrt" or "none".
    fast_lr_scaling: str = "linear"
    # Seed for data order, LoRA init and dropout; the same seed and data give the same losses (resume test).
    seed: int = 42
    # Save a resumable checkpoint every this many optimizer steps.
    save_steps: int = 100
    # Checkpoints kept in the run directory (older ones deleted): the seed project kept 2.
    save_total_limit: int = 2
    # Log the training loss every this many steps; 1 keeps the full curve for the report and the NaN guard.
    logging_steps: int = 1
    # Fewer training examples than this is an error, not a run: a loop cycle should wait for more feedback.
    min_examples: int = 8
    # Share of the mixed training set taken from replayed earlier curated examples (0 = new ones only), so
    # earlier corrections are not forgotten when a cycle trains on top of the promoted model.
    replay_ratio: float = 0.5
    # When no eval file is given, hold out this share of the data (at least 1 example) for held-out loss.
    eval_fraction: float = 0.1
    # A run whose training loss stays above this multiple of the first logged loss (taken as at least 1 nat:
    # single batches are noisy) is exploding and fails. "Stays": the median of the last
    # `loss_explode_window` logged losses is above the limit, so one hard batch of two examples is not a
    # divergence (a lone 5.3-nat batch in a run near 1 nat stopped good runs). A loss at chance level
    # (0.9 x ln(vocab)) or non-finite fails the run at once whatever these say.
    loss_explode_factor: float = 5.0
    loss_explode_window: int = 5
    # General-ability examples replayed beside the curated ones (chat JSON lines; disjoint from the regression
    # set): "" = trainer/general_replay.jsonl, "off" = none. Without them a first cycle, which has no earlier
    # corrections to replay, trains on corrections alone and the variants that learn most also forget most.
    general_replay: str = ""
    # Whose answers the general replay teaches: "self" = the starting model's own greedy answers to the replay
    # prompts (the cycle generates them), so replay anchors what the model already says instead of pulling it
    # towards other phrasings; "shipped" = the answers in the replay file.
    general_replay_answers: str = "self"
    # General-ability regression set (chat JSON lines); "" means the set shipped in trainer/regression_set.jsonl.
    regression_set: str = ""
    # On CUDA: "qlora" (4-bit NF4 base through bitsandbytes, bf16 compute), "bf16" (bf16 base, bf16 LoRA) or
    # "fp32" (float32 base and LoRA with padded batches, no fast path: the CPU path's arithmetic and steps per
    # epoch on a GPU, so a tuning sweep run there chooses what CPU cycles will do). CPU runs are always fp32.
    cuda_precision: str = "qlora"
    # NEFTune: uniform noise of this scale on the input embeddings while training (0 = off). Noise on the
    # embeddings keeps a small set of corrections from being learned as exact token strings.
    neftune_noise_alpha: float = 0.0
    # Question word dropout (trainer/augment.py): each word of a correction's question is left out with this
    # probability, anew at every step, so no single word becomes the whole cue for its answer (0 = off).
    question_dropout: float = 0.0
    # Paired questions (trainer/compose.py): this share of the single-turn corrections is added again as turns
    # that ask two of them at once, answered by both, so the model learns which part of a question picks the
    # answer (0 = off).
    pair_share: float = 0.0
    # The KL anchor (trainer/anchor.py): this weight x KL(starting weights || adapted) over the answer tokens of
    # the general replay examples is added to the loss, so replay holds the starting model's whole next-token
    # distribution rather than only its greedy answer (0 = off: replay is supervised like any example). 1, because
    # on the tuning scenarios it kept 0.90 of the general answers against 0.74 at the same recall (0.90 against
    # 0.91), where 2 cost 8 points of recall and 4 cost 23 (docs/trainer.md, "The KL anchor").
    kl_weight: float = 1.0
    # Recompute activations in the backward pass: less memory for larger models at ~30% more compute.
    gradient_checkpointing: bool = False
    # Testing hook: make the loss NaN from this optimizer step on (0 = off). Proves the NaN guard end to end.
    inject_nan_at_step: int = 0
    # The variant grid a loop cycle trains (trainer.variants): every learning rate x every rank, each its own
    # run; the single learning_rate/lora_rank above are then overridden. See VariantGrid for the defaults' why.
    learning_rates: list[float] = field(default_factory=lambda: list(DEFAULT_LEARNING_RATES))
    # LoRA ranks of the variant grid.
    lora_ranks: list[int] = field(default_factory=lambda: list(DEFAULT_RANKS))
    # What one run optimises (OBJECTIVES); the grid's `objectives` overrides it per variant.
    objective: str = "sft"
    # The variant grid's objective axis, next to learning_rates and lora_ranks.
    objectives: list[str] = field(default_factory=lambda: list(DEFAULT_OBJECTIVES))
    # DPO/KTO beta: how far the policy may move from the reference model (TRL's default 0.1).
    preference_beta: float = 0.1
    # Learning rate of the DPO/KTO phase; None = the variant's learning_rate. Small curated sets need a strong SFT
    # rate (1e-3), which DPO does not survive: after an SFT phase has already ranked every chosen answer above its
    # rejected one, DPO at 1e-3 kept pushing until the model broke (benchmarks/RESULTS.md, "Preference: a
    # correction scenario"); at 2e-5 the same run promoted. DPO is usually run at 1e-6 to 5e-5.
    preference_learning_rate: float | None = None

    @property
    def alpha(self) -> int:
        """The effective LoRA alpha."""
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank

    def target_modules_value(self) -> str | list[str]:
        """`target_modules` in the form PEFT's LoraConfig takes."""
        if self.target_modules == "all-linear":
            return "all-linear"
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]

    def validate(self) -> list[str]:
        """Every problem with this config, all at once (empty list when valid)."""
        p: list[str] = []

        def positive(name: str, integer: bool = False) -> None:
            value = getattr(self, name)
            ok = isinstance(value, int) if integer else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok or not (value > 0 and math.isfinite(value)):
                kind = "an integer" if integer else "a number"
                p.append(f"trainer.{name} must be {kind} > 0, got {value!r}")

        positive("learning_rate")
        for name in ("lora_rank", "batch_size", "grad_accum", "max_length", "save_steps",
                     "save_total_limit", "logging_steps", "min_examples"):
            positive(name, integer=True)
        if self.lora_alpha is not None and (not isinstance(self.lora_alpha, int) or self.lora_alpha <= 0):
            p.append(f"trainer.lora_alpha must be an integer > 0 or unset (= 2 * rank), got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            p.append(f"trainer.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not self.target_modules_value():
            p.append("trainer.target_modules must be 'all-linear' or a comma-separated list of module names")
        if not isinstance(self.max_steps, int) or (self.max_steps <= 0 and self.max_steps != -1):
            p.append(f"trainer.max_steps must be a positive integer or -1 (use epochs), got {self.max_steps!r}")
        if self.max_steps == -1 and not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            p.append(f"trainer.epochs must be > 0 when max_steps is -1, got {self.epochs!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            p.append(f"trainer.lr_scheduler must be one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            p.append(f"trainer.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.weight_decay < 0:
            p.append(f"trainer.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm < 0:
            p.append(f"trainer.max_grad_norm must be >= 0, got {self.max_grad_norm!r}")
        if not isinstance(self.fast_min_steps, int) or isinstance(self.fast_min_steps, bool) or self.fast_min_steps < 0:
            p.append(f"trainer.fast_min_steps must be an integer >= 0, got {self.fast_min_steps!r}")
        if self.fast_lr_scaling not in FAST_LR_SCALING_RULES:
            p.append(f"trainer.fast_lr_scaling must be one of {FAST_LR_SCALING_RULES}, got {self.fast_lr_scaling!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            p.append(f"trainer.seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.regression_tolerance, (int, float)) or not self.regression_tolerance >= 0:
            p.append(f"trainer.regression_tolerance must be a number >= 0, got {self.regression_tolerance!r}")
        if not isinstance(self.min_general_kept, (int, float)) or not 0 <= self.min_general_kept <= 1:
            p.append(f"trainer.min_general_kept must be a number in [0, 1], got {self.min_general_kept!r}")
        if self.general_replay_answers not in ("self", "shipped"):
            p.append(f"trainer.general_replay_answers must be 'self' or 'shipped', got {self.general_replay_answers!r}")
        if not 0.0 <= self.replay_ratio < 1.0:
            p.append(f"trainer.replay_ratio must be in [0, 1), got {self.replay_ratio!r}")
        if not 0.0 < self.eval_fraction < 1.0:
            p.append(f"trainer.eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        if not self.loss_explode_factor > 1.0:
            p.append(f"trainer.loss_explode_factor must be > 1, got {self.loss_explode_factor!r}")
        if isinstance(self.loss_explode_window, bool) or not isinstance(self.loss_explode_window, int) \
                or self.loss_explode_window < 1:
            p.append(f"trainer.loss_explode_window must be an integer >= 1, got {self.loss_explode_window!r}")
        if isinstance(self.question_dropout, bool) or not isinstance(self.question_dropout, (int, float)) \
                or not 0 <= self.question_dropout < 1:
            p.append(f"trainer.question_dropout must be a number in [0, 1), got {self.question_dropout!r}")
        if isinstance(self.pair_share, bool) or not isinstance(self.pair_share, (int, float)) \
                or not 0 <= self.pair_share <= 1:
            p.append(f"trainer.pair_share must be a number in [0, 1], got {self.pair_share!r}")
        if self.cuda_precision not in CUDA_PRECISIONS:
            p.append(f"trainer.cuda_precision must be one of {CUDA_PRECISIONS}, got {self.cuda_precision!r}")
        for name in ("neftune_noise_alpha", "kl_weight", "refit_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not (value >= 0 and math.isfinite(value)):
                p.append(f"trainer.{name} must be a number >= 0, got {value!r}")
        if not (isinstance(self.refit_learning_rate_factor, (int, float)) and not isinstance(
                self.refit_learning_rate_factor, bool) and 0 < self.refit_learning_rate_factor <= 1):
            p.append("trainer.refit_learning_rate_factor must be a number in (0, 1], "
                     f"got {self.refit_learning_rate_factor!r}")
        if self.init_adapter and self.objective != "sft":
            p.append(f"trainer.init_adapter continues an sft adapter; objective {self.objective!r} starts fresh")
        if not isinstance(self.inject_nan_at_step, int) or self.inject_nan_at_step < 0:
            p.append(f"trainer.inject_nan_at_step must be an integer >= 0, got {self.inject_nan_at_step!r}")
        if self.objective not in OBJECTIVES:
            p.append(f"trainer.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if isinstance(self.preference_beta, bool) or not isinstance(self.preference_beta, (int, float)) \
                or not (self.preference_beta > 0 and math.isfinite(self.preference_beta)):
            p.append(f"trainer.preference_beta must be a number > 0, got {self.preference_beta!r}")
        if self.preference_learning_rate is not None:
            positive("preference_learning_rate")
        p.extend(self.grid().validate())
        return p

    def grid(self) -> VariantGrid:
        """The variant grid this config asks for."""
        return VariantGrid(learning_rates=list(self.learning_rates or []), ranks=list(self.lora_ranks or []),
                           objectives=list(self.objectives or []))

    # Fields that must be identical to resume a run from its checkpoints (see trainer/resume.py). Others
    # (save_steps, logging, regression_set, ...) may change between a killed run and its resumption.
    RESUME_FIELDS = ("learning_rate", "lora_rank", "lora_alpha", "lora_dropout", "target_modules", "epochs",
                     "max_steps", "batch_size", "grad_accum", "max_length", "lr_scheduler", "warmup_ratio",
                     "weight_decay", "max_grad_norm", "seed", "cuda_precision", "inject_nan_at_step",
                     "neftune_noise_alpha")

    def resume_fields(self) -> dict:
        """The values of RESUME_FIELDS, with lora_alpha resolved; a preference objective adds its own.

        An SFT run's contract has no objective field, so run directories written before objectives existed
        still resume."""
        values = {name: getattr(self, name) for name in self.RESUME_FIELDS}
        values["lora_alpha"] = self.alpha
        if self.kl_weight:  # absent when off, so contracts written before the anchor existed still resume
            values["kl_weight"] = self.kl_weight
        if self.question_dropout:  # absent when off, so contracts written before it existed still resume
            values["question_dropout"] = self.question_dropout
        if self.pair_share:  # absent when off, so contracts written before it existed still resume
            values["pair_share"] = self.pair_share
        if self.use_dora:  # absent when off, so contracts written before it existed still resume
            values["use_dora"] = self.use_dora
        if self.init_adapter:  # absent when fresh, so contracts written before continued runs existed still resume
            values["init_adapter"] = self.init_adapter
        if self.objective != "sft":
            values.update(objective=self.objective, preference_beta=self.preference_beta)
            if self.preference_learning_rate is not None:  # absent: contracts written before it existed resume
                values["preference_learning_rate"] = self.preference_learning_rate
        return values


@dataclass
class VariantGrid:
    """The learning-rate x rank x objective variants one cycle trains and compares on held-out loss."""

    # Learning rates tried (see DEFAULT_LEARNING_RATES for why these).
    learning_rates: list[float] = field(default_factory=lambda: list(DEFAULT_LEARNING_RATES))
    # LoRA ranks tried (alpha = 2 * rank unless TrainConfig.lora_alpha is set).
    ranks: list[int] = field(default_factory=lambda: list(DEFAULT_RANKS))
    # Objectives tried (OBJECTIVES; see DEFAULT_OBJECTIVES).
    objectives: list[str] = field(default_factory=lambda: list(DEFAULT_OBJECTIVES))

    def points(self) -> list[tuple[str, float, int, str]]:
        """(name, learning_rate, rank, objective) for every grid point, in a stable order."""
        return [(variant_name(lr, rank, objective), lr, rank, objective)
                for objective in self.objectives for lr in self.learning_rates for rank in self.ranks]

    def variants(self) -> list[tuple[str, float, int]]:
        """(name, learning_rate, rank) for every grid point, in a stable order (points() adds the objective)."""
        return [(name, lr, rank) for name, lr, rank, _ in self.points()]

    def validate(self) -> list[str]:
        """Every problem with this grid, all at once (empty list when valid)."""
        p: list[str] = []
        if not self.learning_rates:
            p.append("trainer.learning_rates must list at least one learning rate")
        for lr in self.learning_rates:
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
                p.append(f"trainer.learning_rates must be numbers > 0, got {lr!r}")
        if not self.ranks:
            p.append("trainer.lora_ranks must list at least one rank")
        for rank in self.ranks:
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                p.append(f"trainer.lora_ranks must be integers > 0, got {rank!r}")
        if not self.objectives:
            p.append("trainer.objectives must list at least one objective")
        for objective in self.objectives:
            if objective not in OBJECTIVES:
                p.append(f"trainer.objectives must be among {OBJECTIVES}, got {objective!r}")
        names = [name for name, _, _ in self.variants()] if not p else []
        if len(set(names)) != len(names):
            p.append(f"trainer variant grid has duplicate points: {names}")
        return p


def variant_name(learning_rate: float, rank: int, objective: str = "sft") -> str:
    """Directory name of one variant, e.g. 'lr0.001_r16', 'lr0.001_r16_sft+dpo' (six significant digits
    keep distinct rates apart; SFT variants carry no suffix, so their names stay what they always were)."""
    return f"lr{learning_rate:g}_r{rank}" + ("" if objective == "sft" else f"_{objective}")


def config_field_names(cls) -> list[str]:
    """Names of a config dataclass's fields (the composed loop config uses them for overrides)."""
    return [f.name for f in fields(cls)]


@dataclass(frozen=True)
class TrainerRootConfig(RootConfig):
    """What ``python -m trainer.train`` loads: the ``trainer`` section alone (the run needs no other)."""

    trainer: TrainConfig


def load_train_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
                      overrides: Sequence[str] = ()) -> TrainConfig:
    """The ``[trainer]`` section of the config file, then ``LOOP_TRAINER__*``, then ``overrides``
    (``trainer.field=value``), validated by the core's loader: a ConfigError names every bad key at once."""
    return load_root(TrainerRootConfig, path, env, overrides=overrides).trainer
