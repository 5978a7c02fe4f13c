"""Synthetic, already tokenized chat examples for the GPU training benchmark.

Why synthetic: the benchmark machine reaches no hub, and throughput depends on the lengths and the loss mask, not
on which tokens they are. Why still learnable: so the loss curves of two configurations can be compared. Each
example is a chat turn pair in token form: a system/user prompt (masked out of the loss, as our trainer masks
prompts) and an assistant answer that follows a fixed random bigram process (8 successors per token over a
sub-vocabulary), so a model can push the loss from ln(vocab) toward ln(8).

Lengths: log-normal, mean about 600 tokens, about 4% of examples between 1800 and 2048 (long conversations),
none under 48. `length_stats` reports what was drawn.
"""

from __future__ import annotations

import math
import random

SUBVOCAB = 8000
SUCCESSORS = 8
SPECIAL = (1, 2, 3, 4)  # <bos>, <|user|>, <|assistant|>, <eos>: a chat template's markup in token form


def draw_length(rng: random.Random, max_len: int = 2048) -> int:
    if rng.random() < 0.04:
        return rng.randint(int(max_len * 0.88), max_len)
    # log-normal with median ~430 and sigma 0.75: mean ~570 before the long tail above
    n = int(math.exp(rng.gauss(math.log(430), 0.75)))
    return max(48, min(max_len, n))


def make_examples(n: int, vocab_size: int, seed: int = 0, max_len: int = 2048) -> list[dict]:
    """`n` examples as {"input_ids": [...], "labels": [...]} with prompt labels set to -100."""
    table_rng = random.Random(1234)  # one language for every split and seed
    base = 16
    sub = min(SUBVOCAB, vocab_size - base)
    successors = [[table_rng.randrange(sub) + base for _ in range(SUCCESSORS)] for _ in range(sub)]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        total = draw_length(rng, max_len)
        prompt_len = max(8, int(total * rng.uniform(0.2, 0.5)))
        answer_len = max(4, total - prompt_len)
        prompt = [SPECIAL[0], SPECIAL[1]] + [rng.randrange(base, base + sub) for _ in range(prompt_len - 3)]
        prompt.append(SPECIAL[2])
        tok = rng.randrange(base, base + sub)
        answer = []
        for _ in range(answer_len - 1):
            answer.append(tok)
            tok = successors[tok - base][rng.randrange(SUCCESSORS)]
        answer.append(SPECIAL[3])
        ids = prompt + answer
        out.append({"input_ids": ids, "labels": [-100] * len(prompt) + answer})
    return out


def length_stats(examples: list[dict], max_length: int | None = None) -> dict:
    lengths = sorted(len(e["input_ids"]) for e in examples)
    cut = [min(n, max_length) for n in lengths] if max_length else lengths
    return {
        "n": len(lengths),
        "mean": sum(lengths) / len(lengths),
        "median": lengths[len(lengths) // 2],
        "p95": lengths[int(0.95 * (len(lengths) - 1))],
        "max": lengths[-1],
        "share_over_1800": sum(n > 1800 for n in lengths) / len(lengths),
        "mean_after_truncation": sum(cut) / len(cut),
    }


def tokenizer_stub():
    """A minimal fast tokenizer (pad/eos/unk) so TRL accepts pre-tokenized data without fetching a tokenizer."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<|user|>": 2, "<|assistant|>": 3, "<eos>": 4, "<unk>": 5}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   bos_token="<bos>")


if __name__ == "__main__":
    import json

    print(json.dumps(length_stats(make_examples(2000, 128256), 1024), indent=1))
