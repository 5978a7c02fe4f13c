"""The judge's losses: the mean cross-entropy per answer token, from one padded no-grad forward pass."""

from __future__ import annotations

import pytest
from test_trainer_anchor import _randomly_adapted
from test_trainer_train import facts

from trainer.data import tokenize_examples
from trainer.evaluate import eval_loss


@pytest.mark.slow
def test_the_judge_runs_the_lm_head_on_the_answer_tokens_only_and_scores_as_a_whole_forward_pass(base_hf_dir):
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_hf_dir)
    base, model = _randomly_adapted(base_hf_dir)
    examples = facts()[:5]
    rows = tokenize_examples(tokenizer, examples, 512).rows
    answer_tokens = sum(sum(label != -100 for label in row["labels"][1:]) for row in rows)

    def whole_forward_loss(adapter: bool) -> float:
        """HF's own loss, one example at a time (no padding), token-weighted as the judge weights it."""
        total = count = 0.0
        with torch.no_grad():
            for row in rows:
                ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
                n = int((labels[0, 1:] != -100).sum())
                if adapter:
                    total += float(model(input_ids=ids, labels=labels).loss) * n
                else:
                    with model.disable_adapter():
                        total += float(model(input_ids=ids, labels=labels).loss) * n
                count += n
        return total / count

    heads = []
    hook = base.get_output_embeddings().register_forward_hook(lambda module, args, out: heads.append(args[0].shape))
    adapted = eval_loss(model, examples, tokenizer, 512, batch_size=4)
    start = eval_loss(model, examples, tokenizer, 512, batch_size=4, disable_adapter=True)
    hook.remove()
    # the head saw one row per answer token (in two batches, twice), never a whole padded batch
    assert all(len(shape) == 2 for shape in heads) and sum(s[0] for s in heads) == 2 * answer_tokens, heads
    assert adapted != pytest.approx(start)  # the adapter is on in one, off in the other
    assert adapted == pytest.approx(whole_forward_loss(True), rel=1e-5)
    assert start == pytest.approx(whole_forward_loss(False), rel=1e-5)
