"""General answers kept: does the model still say what it knew, at the point where it used to say it?

A loss over a fixed set of general answers is a poor guard against the forgetting users notice. When a
taught fact ("the largest settlement of Vell is Korran") bleeds into a general question ("the capital of
France is ..."), one token of one answer changes while the average loss barely moves, and it can even
fall as the model gets surer of its chat style (docs/judging.md has the figures). This module measures the
failure itself, on the regression set, which is tuning data disjoint from every scenario's probes:

  1. once, at the start, the starting weights answer every regression prompt greedily; an answer is
     *right* when one of the example's ``expect`` patterns (case-insensitive regular expressions) matches
     it, and the first match is the answer's *key* (the capital's name, the sum, the animal);
  2. a later model keeps an answer when, fed the starting model's own answer token by token (teacher
     forcing), its most likely next token is the starting answer's at every token of the key. That is what
     greedy decoding would produce at that point given the same lead-in: a rephrased lead-in does not count
     as forgetting, a different key does.

``general_kept`` is the share of the right starting answers kept (1.0 at the start; None when the starting
model answered none right). One forward pass per answer: cheap enough to judge every epoch.

Contract: ``KeptProbe.build`` runs with whatever weights the model has when called (the trainer calls it with
the adapter disabled); ``KeptProbe.share`` never changes the model's train/eval mode.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trainer.data import tokenize_example

# Greedy answers to the regression prompts are short (one sentence); the key comes early.
ANSWER_TOKENS = 48
# Where a run keeps its probe, so that every epoch, a resumed run and the final report judge the same keys.
PROBE_FILE = "general_kept.json"


@dataclass
class _Key:
    example_id: str
    input_ids: list[int]
    positions: list[int]  # indices in input_ids of the key's tokens


@dataclass
class KeptProbe:
    keys: list[_Key] = field(default_factory=list)
    asked: int = 0  # regression examples with expect patterns
    answers: dict[str, str] = field(default_factory=dict)  # the starting model's answers, by example id

    @classmethod
    def build(cls, model, tokenizer, examples: list[dict], max_length: int = 512) -> KeptProbe:
        """The starting model's greedy answers to ``examples`` (those with ``expect``) and their keys."""
        probe = cls()
        asked = [e for e in examples if e.get("expect")]
        probe.asked = len(asked)
        if not asked:
            return probe
        for example, answer in zip(asked, _greedy(model, tokenizer, [e["messages"][:-1] for e in asked])):
            probe.answers[example["id"]] = answer
            span = _key_span(answer, example["expect"])
            if span is None:
                continue
            messages = example["messages"][:-1] + [{"role": "assistant", "content": answer}]
            tok = tokenize_example(tokenizer, messages, max_length)
            positions = _span_tokens(tokenizer, tok.input_ids, tok.completion_mask, span)
            if positions:
                probe.keys.append(_Key(example["id"], tok.input_ids, positions))
        return probe

    @classmethod
    def for_run(cls, output_dir: Path, model, tokenizer, examples: list[dict], max_length: int = 512) -> KeptProbe:
        """The run's probe: read from ``output_dir`` or built with the adapter off (the starting weights:
        LoRA leaves them untouched, so this holds at any step) and saved there."""
        path = Path(output_dir) / PROBE_FILE
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                return cls(keys=[_Key(**k) for k in data["keys"]], asked=data["asked"], answers=data["answers"])
            except (OSError, ValueError, KeyError, TypeError):
                pass  # a damaged file is rebuilt below
        off = model.disable_adapter() if hasattr(model, "disable_adapter") else None
        if off is None:
            probe = cls.build(model, tokenizer, examples, max_length)
        else:
            with off:
                probe = cls.build(model, tokenizer, examples, max_length)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(PROBE_FILE + ".tmp")
        tmp.write_text(json.dumps({"keys": [asdict(k) for k in probe.keys], "asked": probe.asked,
                                   "answers": probe.answers}))
        os.replace(tmp, path)
        return probe

    def share(self, model) -> float | None:
        """The share of the starting model's right answers whose key the model still predicts."""
        if not self.keys:
            return None
        return sum(self.kept(model).values()) / len(self.keys)

    def kept(self, model, batch_size: int = 8) -> dict[str, bool]:
        import torch

        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        out = {}
        try:
            with torch.no_grad():
                for start in range(0, len(self.keys), batch_size):
                    batch = self.keys[start:start + batch_size]
                    width = max(len(k.input_ids) for k in batch)
                    ids = torch.zeros((len(batch), width), dtype=torch.long)
                    attention = torch.zeros((len(batch), width), dtype=torch.long)
                    for i, key in enumerate(batch):  # right padding: the keys' positions stay where they are
                        ids[i, :len(key.input_ids)] = torch.tensor(key.input_ids)
                        attention[i, :len(key.input_ids)] = 1
                    predicted = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.argmax(-1)
                    for i, key in enumerate(batch):
                        # Position p is predicted by the logits at p - 1.
                        out[key.example_id] = all(int(predicted[i, p - 1]) == key.input_ids[p] for p in key.positions)
        finally:
            if was_training:
                model.train()
        return out


def is_right(answer: str, expect: list[str]) -> bool:
    return _key_span(answer, expect) is not None


def _key_span(answer: str, expect: list[str]) -> tuple[int, int] | None:
    matches = [m for pattern in expect for m in [re.search(pattern, answer, flags=re.IGNORECASE)] if m]
    if not matches:
        return None
    first = min(matches, key=lambda m: m.start())
    return first.start(), first.end()


def _span_tokens(tokenizer, input_ids: list[int], mask: list[int], span: tuple[int, int]) -> list[int]:
    """Indices of the answer tokens that overlap the answer's character span ``span``."""
    answer_at = [i for i, m in enumerate(mask) if m]
    positions, consumed = [], 0
    for _n, index in enumerate(answer_at):
        text = tokenizer.decode(input_ids[answer_at[0]:index + 1], skip_special_tokens=True)
        start, end = consumed, len(text)
        consumed = end
        if end > span[0] and start < span[1] and index > 0:
            positions.append(index)
        if end >= span[1]:
            break
    return positions


def _greedy(model, tokenizer, prompts: list[list[dict]]) -> list[str]:
    """Greedy answers, batched with left padding (one generate call)."""
    import torch

    from trainer.data import hf_chat_ids

    rows = [hf_chat_ids(tokenizer, messages, True) for messages in prompts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        attention[i, width - len(row):] = 1
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=attention.to(device),
                                 max_new_tokens=ANSWER_TOKENS, do_sample=False, pad_token_id=pad)
    finally:
        if was_training:
            model.train()
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
