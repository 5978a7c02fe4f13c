"""The KL anchor: general replay answers keep the starting weights' whole next-token distribution.

Replay teaches the starting model's own greedy answer to each general prompt, one token per position. The anchor
adds ``TrainConfig.kl_weight`` x KL(start || adapted), the mean over the answer tokens of the general replay
examples, to the supervised loss: every position pulls the adapted model towards the starting weights' full
distribution (what they would have said, and how sure they were), not only towards their top token. The
starting weights are the same model with its LoRA adapter switched off (``disable_adapter``): no second copy of
the model. Their log-probabilities are computed once per run for each anchored row, with a forward pass without
gradients over the rows of a batch that hold anchored tokens, and kept (``StartCache``) for the later epochs;
the LM head, adapted or not, runs on the answer tokens only where the model allows it (``answer_logits``).

Contract:
  - ``anchored(SFTTrainer)`` returns a subclass of the trainer that takes ``kl_weight``; its training rows carry
    ``"anchor": 1`` on general replay examples (``is_anchor``: ids that start ``general-``, the ids
    trainer/general_replay.jsonl gives them and every replay source keeps) and 0 on the others, which
    ``tokenize_examples(..., anchor=True)`` adds.
  - ``replay_anchored(DPOTrainer | KTOTrainer)`` returns a subclass that takes ``kl_weight`` and
    ``anchor_rows`` (general replay examples as ``tokenize_examples`` gives them: ``input_ids`` + ``labels``).
    A preference batch holds pairs or labels, never replay, so every training micro-batch adds the same KL term
    on ``batch_size`` anchor rows of its own, taken in turn by optimizer step (a resumed run takes the same
    ones). The starting weights are still the model with every adapter off: for ``sft+X`` that is the cycle's
    starting model, not the SFT stage (TRL's frozen "ref" adapter is off too).
  - Evaluation is the plain loss of each trainer, so held-out and regression losses mean the same with or
    without the anchor. Nothing here imports torch or TRL at module level.
"""

from __future__ import annotations

from trainer.data import keep_columns

GENERAL_REPLAY_PREFIX = "general-"


def is_anchor(example: dict) -> bool:
    """Whether an example is a general replay example, whose answers the anchor holds to the starting weights."""
    return str(example.get("id") or "").startswith(GENERAL_REPLAY_PREFIX)


def anchored(trainer_class):
    """`trainer_class` (TRL's SFTTrainer) with the KL anchor added to its training loss."""
    import torch
    import torch.nn.functional as F

    class AnchoredSFTTrainer(trainer_class):
        def __init__(self, *args, kl_weight: float, **kwargs):
            super().__init__(*args, **kwargs)
            self.kl_weight = kl_weight
            self.data_collator = AnchorCollator(self.data_collator)
            self.start_cache = StartCache()
            keep_columns(self, "anchor")

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            anchor = inputs.pop("anchor", None)
            if anchor is None or not model.training or not bool(anchor.any()) or return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs["labels"]
            forward = {k: v for k, v in inputs.items() if k != "labels"}
            forward["use_cache"] = False
            targets = labels[:, 1:]
            answer = targets != -100
            logits = answer_logits(self, model, forward, answer)  # one row per answer token
            denominator = answer.sum() if num_items_in_batch is None else num_items_in_batch
            supervised = F.cross_entropy(logits, targets[answer], reduction="sum")
            supervised = supervised / torch.as_tensor(denominator, device=supervised.device).clamp(min=1)
            held = answer & anchor[:, 1:].bool()
            return supervised + self.kl_weight * _kl_to_start(self, model, forward, logits[held[answer]], held)

    return AnchoredSFTTrainer


def _kl_to_start(trainer, model, forward: dict, adapted, held):
    """KL(start || adapted), averaged over the ``held`` positions (a mask over ``forward``'s shifted positions);
    ``adapted`` holds the adapted model's logits at those positions, in order, the start is ``model`` with every
    adapter off; logged as ``anchor_kl`` beside the loss."""
    import torch.nn.functional as F

    cache = getattr(trainer, "start_cache", None)
    if cache is not None and cache.usable(trainer, forward):
        start = cache.log_probs(trainer, model, forward, held)
    else:
        start = _start_log_probs(trainer, model, forward, held)
    kl = F.kl_div(F.log_softmax(adapted, dim=-1), start, log_target=True, reduction="batchmean")
    trainer._metrics["train"]["anchor_kl"].append(float(kl.detach()))
    return kl


def _start_log_probs(trainer, model, forward: dict, held):
    """The starting weights' log-probabilities at the ``held`` positions, in mask order."""
    import torch
    import torch.nn.functional as F

    # Only the rows that hold anchored tokens go through the starting weights: about half of a batch mixed at
    # replay_ratio 0.5, so the extra forward pass costs half as much. Rows do not see each other (right padding,
    # a per-row causal mask), so their starting logits are those of the whole batch.
    rows = held.any(dim=1)
    sliced = {k: v[rows] if torch.is_tensor(v) and v.dim() > 0 and v.size(0) == rows.size(0) else v
              for k, v in forward.items()}
    with torch.no_grad(), trainer.accelerator.unwrap_model(model).disable_adapter():
        return F.log_softmax(answer_logits(trainer, model, sliced, held[rows]), dim=-1)


# What the start cache may hold: a 135M model's 33 general replay answers take about 300 MB; rows beyond the budget
# are computed at every step, as without the cache.
START_CACHE_BYTES = 1 << 30


class StartCache:
    """The starting weights' log-probabilities at each training row's anchored tokens, computed once per run.

    The starting weights never change during a run and every epoch shows them the same general replay rows, so
    from the second epoch on the anchor needs no forward pass of its own. A row is known by its tokens and its
    anchored positions. Only padded batches are cached (each row its own sequence: a padding-free batch packs
    different rows together every epoch), and not with NEFTune, whose noise reaches the starting weights too.
    Cached values equal recomputed ones up to the float rounding of another batch's padding."""

    def __init__(self, budget: int = START_CACHE_BYTES):
        self.rows: dict[bytes, object] = {}
        self.budget, self.size = budget, 0

    @staticmethod
    def usable(trainer, forward: dict) -> bool:
        packed = any(k in forward for k in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k"))
        noisy = getattr(getattr(trainer, "args", None), "neftune_noise_alpha", None)
        return "attention_mask" in forward and not packed and not noisy

    def log_probs(self, trainer, model, forward: dict, held):
        import torch

        ids, mask = forward["input_ids"], forward["attention_mask"].bool()
        order = [int(i) for i in held.any(dim=1).nonzero().flatten()]
        keys = {i: ids[i][mask[i]].cpu().numpy().tobytes() + b"|" + held[i].nonzero().cpu().numpy().tobytes()
                for i in order}
        missing = [i for i in order if keys[i] not in self.rows]
        fresh = {}
        if missing:
            only = torch.zeros_like(held)
            only[missing] = held[missing]
            parts = _start_log_probs(trainer, model, forward, only).split(held[missing].sum(dim=1).tolist())
            fresh = dict(zip(missing, parts))
            for i, part in fresh.items():
                size = part.numel() * part.element_size()
                if self.size + size <= self.budget:
                    self.rows[keys[i]], self.size = part, self.size + size
        return torch.cat([fresh[i] if i in fresh else self.rows[keys[i]] for i in order])


def answer_logits(trainer, model, forward: dict, positions):
    """The next-token logits of ``model`` on ``forward`` at ``positions`` (a bool mask over the shifted positions,
    ``[rows, length - 1]``), as float32 rows in mask order.

    The loss reads the logits at answer tokens only (a third of a padded batch of chat turns), so when the model
    runs unwrapped (one process: no data-parallel wrapper whose forward must run) the LM head sees only those
    positions (``trainer.evaluate.logits_at``); otherwise the whole forward runs and the positions are picked."""
    import torch.nn.functional as F

    from trainer.evaluate import logits_at

    if trainer.accelerator.unwrap_model(model) is not model:
        return model(**forward).logits[:, :-1][positions].float()
    return logits_at(model, forward, F.pad(positions, (0, 1)))


def replay_anchored(trainer_class):
    """`trainer_class` (TRL's DPOTrainer or KTOTrainer) with the KL anchor on general replay rows of its own."""
    import torch
    from trl.trainer.utils import pad

    class ReplayAnchoredTrainer(trainer_class):
        def __init__(self, *args, kl_weight: float, anchor_rows: list[dict], **kwargs):
            super().__init__(*args, **kwargs)
            self.kl_weight = kl_weight
            self.anchor_rows = anchor_rows
            self.start_cache = StartCache()

        def _anchor_batch(self) -> dict:
            """The anchor rows of this optimizer step, right-padded: ids, attention and the answer tokens."""
            size = self.args.per_device_train_batch_size
            start = (self.state.global_step * size) % len(self.anchor_rows)
            rows = (self.anchor_rows * 2)[start:start + min(size, len(self.anchor_rows))]

            def padded(key, fill):
                return pad([torch.tensor(r[key]) for r in rows], padding_value=fill,
                           padding_side="right").to(self.args.device)

            ids = padded("input_ids", self.processing_class.pad_token_id or 0)
            return {"input_ids": ids, "attention_mask": padded("input_ids", -1) != -1,
                    "answer": padded("labels", -100) != -100}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not model.training:
                return out
            batch = self._anchor_batch()
            forward = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"].long(),
                       "use_cache": False}
            held = batch["answer"][:, 1:]
            kl = _kl_to_start(self, model, forward, answer_logits(self, model, forward, held), held)
            if return_outputs:
                return out[0] + self.kl_weight * kl, out[1]
            return out + self.kl_weight * kl

    return ReplayAnchoredTrainer


class AnchorCollator:
    """TRL's collator, plus a per-token "anchor" tensor laid out like its input_ids: padded on the right, or
    flattened into one row when the collator is padding-free (the GPU fast path)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples: list[dict]) -> dict:
        import torch
        from trl.trainer.utils import pad

        flags = [int(example.pop("anchor", 0)) for example in examples]
        output = self.inner(examples)
        per_token = [torch.full((len(example["input_ids"]),), flag, dtype=torch.long)
                     for example, flag in zip(examples, flags)]
        if getattr(self.inner, "padding_free", False):
            per_token = [torch.cat(per_token, dim=0)]
        output["anchor"] = pad(per_token, padding_value=0, padding_side="right",
                               pad_to_multiple_of=getattr(self.inner, "pad_to_multiple_of", None))
        return output
