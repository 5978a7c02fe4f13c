"""General answers kept: does the model still give the general answers it gave right?

A loss averaged over a fixed set of general answers is a poor guard against the forgetting users notice.
When a taught fact ("the largest settlement of Vell is Korran") bleeds into a general question ("the
capital of Thailand is ..."), one answer changes while the average loss barely moves, and it can even fall
as the model gets surer of its chat style (docs/judging.md has the figures). So the judge measures the
failure itself, on the regression set (tuning data, disjoint from every scenario's probes):

  1. once, at the start, the starting weights answer every regression prompt greedily; an answer is
     *right* when one of the example's ``expect`` patterns (case-insensitive regular expressions) matches;
  2. a later model answers the prompts the start got right, greedily, and keeps each one whose answer
     still matches. A reworded answer that still names the capital is kept; another capital is not.

``general_kept`` is the share of the right starting answers still right (None when the start got none
right). The starting answers are one batched greedy generation; a later model's are checked first with one
teacher-forced forward pass (an answer it would write unchanged needs no decoding), and only the answers
that changed are generated (``KeptProbe.kept``).

Contract: ``KeptProbe.build`` runs with whatever weights the model has when called (``for_run`` turns a
PEFT adapter off, i.e. the starting weights); nothing here changes the model's train/eval mode.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

# Greedy answers to the regression prompts are short (one sentence); the key comes early.
ANSWER_TOKENS = 48
# Where a run keeps its probe, so that every epoch, a resumed run and the final report judge the same keys.
PROBE_FILE = "general_kept.json"


@dataclass
class KeptProbe:
    right: list[dict] = field(default_factory=list)  # the examples the starting weights answered right
    asked: int = 0  # regression examples with expect patterns
    answers: dict[str, str] = field(default_factory=dict)  # the starting model's answers, by example id

    @classmethod
    def build(cls, model, tokenizer, examples: list[dict], max_length: int = 512) -> KeptProbe:
        """The starting model's greedy answers to ``examples`` (those with ``expect``) and which are right."""
        probe = cls()
        asked = [e for e in examples if e.get("expect")]
        probe.asked = len(asked)
        if not asked:
            return probe
        for example, answer in zip(asked, _greedy(model, tokenizer, [e["messages"][:-1] for e in asked])):
            probe.answers[example["id"]] = answer
            if is_right(answer, example["expect"]):
                probe.right.append({"id": example["id"], "messages": example["messages"][:-1],
                                    "expect": example["expect"]})
        return probe

    @classmethod
    def for_run(cls, output_dir: Path, model, tokenizer, examples: list[dict], max_length: int = 512,
                weights_dir: str | Path | None = None) -> KeptProbe:
        """The run's probe: read from ``output_dir`` or built with the adapter off (the starting weights:
        LoRA leaves them untouched, so this holds at any step) and saved there. ``weights_dir``: where the
        starting weights are; the same weights asked the same prompts answer once (trainer/start_cache.py)."""
        from trainer.start_cache import cached

        path = Path(output_dir) / PROBE_FILE
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                return cls(right=data["right"], asked=data["asked"], answers=data["answers"])
            except (OSError, ValueError, KeyError, TypeError):
                pass  # a damaged file is rebuilt below

        def build() -> dict:
            off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
            with off:
                probe = cls.build(model, tokenizer, examples, max_length)
            return {"right": probe.right, "asked": probe.asked, "answers": probe.answers}

        spec = {"prompts": [[e["id"], e["messages"][:-1], e["expect"]] for e in examples if e.get("expect")],
                "answer_tokens": ANSWER_TOKENS}
        data = cached(weights_dir, model, tokenizer, "general_answers", spec, build)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(PROBE_FILE + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
        return cls(right=data["right"], asked=data["asked"], answers=data["answers"])

    def share(self, model, tokenizer) -> float | None:
        """The share of the starting model's right answers that ``model`` still gives right."""
        if not self.right:
            return None
        kept = self.kept(model, tokenizer)
        return sum(kept.values()) / len(kept)

    def kept(self, model, tokenizer) -> dict[str, bool]:
        """Whether ``model``'s greedy answer to each right example still matches its patterns.

        Most answers come out exactly as the starting model gave them, and that is checked without
        generating: one teacher-forced forward pass over prompt + starting answer + end of turn, and when the
        model's most likely next token is the answer's own at every position, greedy decoding would write
        that very answer (the same tokens; float rounding aside, as between any two batchings). Only the
        answers that changed are generated, so a judge of 32 prompts costs one forward pass instead of 48
        decoding steps when nothing moved (benchmarks/judge_speed.py)."""
        same = _reproduces(model, tokenizer, [(e["messages"], self.answers.get(e["id"])) for e in self.right])
        verdict = {e["id"]: is_right(self.answers[e["id"]], e["expect"]) for e, s in zip(self.right, same) if s}
        changed = [e for e, s in zip(self.right, same) if not s]
        if changed:
            answers = _greedy(model, tokenizer, [e["messages"] for e in changed])
            verdict.update({e["id"]: is_right(a, e["expect"]) for e, a in zip(changed, answers)})
        return {e["id"]: verdict[e["id"]] for e in self.right}


def is_right(answer: str, expect: list[str]) -> bool:
    return _key_span(answer, expect) is not None


def _key_span(answer: str, expect: list[str]) -> tuple[int, int] | None:
    matches = [m for pattern in expect for m in [re.search(pattern, answer, flags=re.IGNORECASE)] if m]
    if not matches:
        return None
    first = min(matches, key=lambda m: m.start())
    return first.start(), first.end()


def _reproduces(model, tokenizer, cases: list[tuple[list[dict], str | None]], batch_size: int = 8) -> list[bool]:
    """For each (prompt, answer): would greedy decoding of ``model`` give exactly ``answer``?

    True only when it provably would: the answer's tokens decode back to it, and under teacher forcing the
    model's argmax is the answer's next token at every position, then an end-of-turn token, unless the answer
    fills the whole ``ANSWER_TOKENS`` budget. False means "not shown", never "different": the caller generates.
    """
    import torch

    from trainer.data import hf_chat_ids
    from trainer.evaluate import pad_id, padded_logits

    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [tokenizer.eos_token_id])
    rows: list[tuple[int, list[int], int] | None] = []  # (answer start, prompt + answer ids, answer length)
    for messages, answer in cases:
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"] if answer is not None else []
        if not ids or len(ids) > ANSWER_TOKENS or tokenizer.decode(ids, skip_special_tokens=True).strip() != answer:
            rows.append(None)  # the stored text is not a token sequence generation could have written
            continue
        prompt = hf_chat_ids(tokenizer, messages, True)
        rows.append((len(prompt), prompt + ids, len(ids)))
    out = [False] * len(cases)
    todo = [i for i, row in enumerate(rows) if row is not None]
    sequences = [rows[i][1] for i in todo]  # type: ignore[index]
    # Position t predicts token t + 1: from the prompt's last token, the answer's tokens, then what follows.
    wanted = [list(range(rows[i][0] - 1, len(rows[i][1]))) for i in todo]  # type: ignore[index]
    for start, _, at, logits in padded_logits(model, sequences, wanted, pad_id(tokenizer), batch_size):
        best = logits.argmax(-1).cpu().split(at.sum(-1).tolist())
        for j, i in enumerate(todo[start:start + len(best)]):
            begin, seq, n = rows[i]  # type: ignore[misc]
            same = torch.equal(best[j][:n], torch.tensor(seq[begin:]))
            ends = n == ANSWER_TOKENS or int(best[j][n]) in eos_ids
            out[i] = bool(same and ends)
    return out


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
