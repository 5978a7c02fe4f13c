"""LoRA fine-tuning of the chat model on curated feedback: train, compare variants, evaluate.

Knows nothing of Argilla or Gradio and imports only the core (`loop.core`) of the loop: it takes a snapshot of
chat examples (JSON lines) and a base model.
Heavy libraries (torch, transformers, TRL, PEFT) are imported only when a function needs them.

    from trainer.train import train          # (trainer.train is the module; the function lives in it)
    from trainer import TrainConfig, VariantGrid, run_variants, best_variant
    metrics = train("snapshot/train.jsonl", "runs/r1", eval_data="snapshot/eval.jsonl")
"""

from trainer.config import TrainConfig, VariantGrid

__all__ = [
    "TrainConfig", "VariantGrid", "run_variants", "best_variant", "VariantResult", "eval_loss",
    "build_training_set", "ensure_hf_base", "find_bundled_gguf",
]


def __getattr__(name):  # lazy re-exports: `import trainer` stays cheap for the app and the loop's CLI
    if name in ("run_variants", "best_variant", "VariantResult"):
        from trainer import variants
        return getattr(variants, name)
    if name == "eval_loss":
        from trainer.evaluate import eval_loss
        return eval_loss
    if name == "build_training_set":
        from trainer.data import build_training_set
        return build_training_set
    if name in ("ensure_hf_base", "find_bundled_gguf"):
        from trainer import base_model
        return getattr(base_model, name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
