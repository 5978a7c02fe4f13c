"""The KL anchor (trainer/anchor.py) on the bundled SmolLM2-135M on the CPU: general replay answers are held to
the starting weights' distribution, only they are, and the setting is checked and part of a run's contract."""

from __future__ import annotations

import pytest
from test_trainer_train import facts, small_config

from trainer.anchor import _kl_to_start, answer_logits
from trainer.config import TrainConfig
from trainer.data import tokenize_examples, write_examples
from trainer.evaluate import load_general_replay


def general(count: int = 4) -> list[dict]:
    return load_general_replay(TrainConfig())[:count]


def test_only_general_replay_rows_are_flagged_and_the_flag_reaches_the_batch_token_by_token(base_hf_dir, tmp_path):
    from transformers import AutoTokenizer

    from trainer.train import build_trainer

    tokenizer = AutoTokenizer.from_pretrained(str(base_hf_dir))
    examples = facts()[:2] + general(2)
    rows = tokenize_examples(tokenizer, examples, 64, anchor=True).rows
    assert [row["anchor"] for row in rows] == [0, 0, 1, 1]
    assert "anchor" not in tokenize_examples(tokenizer, examples, 64).rows[0]  # off: the rows are as before

    trainer, _ = build_trainer(str(base_hf_dir), tokenizer, rows, [], tmp_path / "run",
                               small_config(tmp_path, batch_size=4, kl_weight=1.0))
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["anchor"].shape == batch["input_ids"].shape
    for ids, flags, mask in zip(batch["input_ids"].tolist(), batch["anchor"].tolist(),
                                batch["attention_mask"].tolist()):
        flag = 1 if any(flags) else 0
        # one flag per row, on every real token and on no padding
        assert flags == [flag if m else 0 for m in mask], ids
    assert sorted(max(flags) for flags in batch["anchor"].tolist()) == [0, 0, 1, 1]


def _drift(adapter_dir, base_hf_dir, examples: list[dict]) -> float:
    """Mean KL(start || adapted) per answer token of `examples`: how far the adapter moved their answers."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_hf_dir))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_hf_dir)), str(adapter_dir))
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in tokenize_examples(tokenizer, examples, 128).rows:
            ids = torch.tensor([row["input_ids"]])
            answer = torch.tensor(row["labels"][1:]) != -100
            adapted = F.log_softmax(model(input_ids=ids).logits[0, :-1][answer], dim=-1)
            with model.disable_adapter():
                start = F.log_softmax(model(input_ids=ids).logits[0, :-1][answer], dim=-1)
            total += float((start.exp() * (start - adapted)).sum())
            tokens += int(answer.sum())
    return total / tokens


@pytest.mark.slow
def test_the_kl_anchor_keeps_general_replay_answers_closer_to_the_starting_weights(base_hf_dir, tmp_path):
    from trainer.train import train

    replay = general(6)
    data = tmp_path / "data.jsonl"
    write_examples(data, facts() + replay)
    drift, metrics = {}, {}
    for weight in (0.0, 5.0):
        # a strong update, so that plain replay moves the general answers measurably
        config = small_config(tmp_path, max_steps=6, save_steps=100, batch_size=7, learning_rate=5e-3,
                              kl_weight=weight, max_length=128)
        run = tmp_path / f"kl{weight}"
        metrics[weight] = train(data, run, base=base_hf_dir, config=config)
        assert metrics[weight]["status"] == "ok", metrics[weight].get("reason")
        drift[weight] = _drift(run / "adapter", base_hf_dir, replay)

    assert drift[5.0] < 0.7 * drift[0.0], drift
    assert metrics[5.0]["config"]["kl_weight"] == 5.0


def test_kl_weight_is_checked_and_part_of_the_contract_only_when_on():
    assert any("kl_weight" in p for p in TrainConfig(kl_weight=-1.0).validate())
    assert any("kl_weight" in p for p in TrainConfig(kl_weight=float("nan")).validate())
    # off, it is absent, so a run written before the anchor existed (trained without it) resumes with it off
    assert "kl_weight" not in TrainConfig(kl_weight=0.0).resume_fields()
    assert TrainConfig().resume_fields()["kl_weight"] == 1.0


def test_on_the_gpu_fast_path_the_flags_are_flattened_with_the_padding_free_batch(base_hf_dir):
    from transformers import AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from trainer.anchor import AnchorCollator

    tokenizer = AutoTokenizer.from_pretrained(str(base_hf_dir))
    rows = tokenize_examples(tokenizer, facts()[:2] + general(1), 64, anchor=True).rows
    inner = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    batch = AnchorCollator(inner)([dict(row) for row in rows])
    lengths = [len(row["input_ids"]) for row in rows]
    assert batch["input_ids"].shape == batch["anchor"].shape == (1, sum(lengths))
    assert batch["anchor"][0].tolist() == [0] * (lengths[0] + lengths[1]) + [1] * lengths[2]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["kto", "dpo"])
def test_a_preference_stage_holds_the_general_replay_answers_of_its_data_to_the_starting_weights(
        objective, base_hf_dir, tmp_path):
    from test_trainer_preference import labels, pairs, write_preference

    from trainer.preference import train_objective

    replay = general(6)
    data = tmp_path / "data.jsonl"
    write_examples(data, facts() + replay)
    preference = write_preference(tmp_path / "snap", pairs(), labels())
    drift, metrics = {}, {}
    for weight in (0.0, 5.0):
        # a strong preference update, so that it moves the general answers it never sees measurably
        config = small_config(tmp_path, objective=objective, max_steps=6, save_steps=100, batch_size=4,
                              learning_rate=5e-3, kl_weight=weight, max_length=128, select_best_epoch=False)
        run = tmp_path / f"{objective}-kl{weight}"
        metrics[weight] = train_objective(data, run, base=base_hf_dir, eval_data=data, preference=preference,
                                          config=config)
        assert metrics[weight]["status"] == "ok", metrics[weight].get("reason")
        drift[weight] = _drift(run / "adapter", base_hf_dir, replay)

    assert drift[5.0] < 0.7 * drift[0.0], drift


def _randomly_adapted(base_hf_dir):
    """(base, PEFT model) of the bundled model with random LoRA B matrices on q and v, in eval mode: the adapted
    model differs from the starting weights, so a KL between them is not zero."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_hf_dir, dtype=torch.float32)
    return base, get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False)).eval()


def _one_process_trainer(**fields):
    """What the anchor reads of a trainer run in one process (no data-parallel wrapper to unwrap)."""
    from collections import defaultdict
    from types import SimpleNamespace

    return SimpleNamespace(accelerator=SimpleNamespace(unwrap_model=lambda m: m),
                           _metrics={"train": defaultdict(list)}, **fields)


@pytest.mark.slow
def test_only_the_rows_holding_anchored_tokens_go_through_the_starting_weights_and_the_kl_is_unchanged(base_hf_dir):
    import torch
    import torch.nn.functional as F

    base, model = _randomly_adapted(base_hf_dir)
    ids = torch.randint(10, 1000, (4, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = mask[3, 7:] = 0  # right padding
    forward = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    held = torch.zeros(4, 11, dtype=torch.bool)
    held[0, 5:9] = held[2, 3:11] = True  # anchored answer tokens in rows 0 and 2 only
    trainer = _one_process_trainer()
    seen = []
    hook = base.get_input_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        logits = model(**forward).logits[:, :-1].float()
        seen.clear()
        kl = _kl_to_start(trainer, model, forward, logits[held], held)
        hook.remove()
        with model.disable_adapter():
            start = model(**forward).logits[:, :-1].float()
    whole = F.kl_div(F.log_softmax(logits[held], dim=-1), F.log_softmax(start[held], dim=-1), log_target=True,
                     reduction="batchmean")
    assert seen == [2]  # one forward pass of the starting weights, on the two anchored rows
    assert float(kl) > 0 and torch.allclose(kl, whole, rtol=1e-4, atol=1e-6), (float(kl), float(whole))
    assert trainer._metrics["train"]["anchor_kl"] == [pytest.approx(float(kl))]


@pytest.mark.slow
def test_the_lm_head_runs_on_the_answer_tokens_only_and_gives_the_logits_of_a_whole_forward_pass(base_hf_dir):
    from types import SimpleNamespace

    import torch

    base, model = _randomly_adapted(base_hf_dir)
    ids = torch.randint(10, 1000, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    forward = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    positions = torch.zeros(3, 9, dtype=torch.bool)
    positions[0, 4:9] = positions[1, 2:5] = positions[2, 7] = True  # 9 answer tokens of 27 positions
    heads = []
    hook = base.get_output_embeddings().register_forward_hook(lambda module, args, out: heads.append(args[0].shape))
    one_process = _one_process_trainer()
    wrapped = torch.nn.Module()  # stands for a data-parallel wrapper: its own forward must run, so no shortcut
    wrapped.forward = lambda **kw: model(**kw)
    data_parallel = SimpleNamespace(accelerator=SimpleNamespace(unwrap_model=lambda m: model))
    with torch.no_grad():
        whole = model(**forward).logits[:, :-1][positions]
        heads.clear()
        picked = answer_logits(one_process, model, forward, positions)
        assert [tuple(s) for s in heads] == [(9, 576)]  # the head saw the answer tokens, not 3 x 10 positions
        heads.clear()
        fallback = answer_logits(data_parallel, wrapped, forward, positions)
        assert [tuple(s) for s in heads] == [(3, 10, 576)]
    hook.remove()
    assert picked.shape == whole.shape == (9, base.config.vocab_size)
    assert torch.allclose(picked, whole, atol=1e-4) and torch.equal(fallback, whole)


@pytest.mark.slow
def test_the_starting_weights_answer_each_anchored_row_once_per_run_and_the_kl_is_unchanged(base_hf_dir):
    from types import SimpleNamespace

    import torch

    from trainer.anchor import StartCache

    base, model = _randomly_adapted(base_hf_dir)
    rows = torch.randint(10, 1000, (3, 12))

    def batch(order: list[int], width: int):
        ids = torch.zeros(len(order), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        held = torch.zeros(len(order), width - 1, dtype=torch.bool)
        for j, r in enumerate(order):
            length = 12 - 2 * r  # rows of 12, 10 and 8 tokens, right-padded to the batch's width
            ids[j, :length], mask[j, :length] = rows[r, :length], 1
            held[j, length - 5:length - 1] = r != 1  # rows 0 and 2 hold anchored tokens
        return {"input_ids": ids, "attention_mask": mask, "use_cache": False}, held

    def trainer(cache):
        return _one_process_trainer(start_cache=cache, args=SimpleNamespace(neftune_noise_alpha=None))

    seen = []
    hook = base.get_input_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    cached, plain = trainer(StartCache()), trainer(None)
    kls = {}
    with torch.no_grad():
        for epoch, order in enumerate(([0, 1, 2], [2, 1, 0])):  # the second epoch pads the rows differently
            forward, held = batch(order, 12 if epoch == 0 else 14)
            adapted = answer_logits(plain, model, forward, held)
            seen.clear()
            kls[epoch] = (_kl_to_start(cached, model, forward, adapted, held),
                          _kl_to_start(plain, model, forward, adapted, held))
            assert seen == ([2] if epoch == 0 else []) + [2], (epoch, seen)  # the cache's pass, then the plain one
    hook.remove()
    for with_cache, without in kls.values():
        assert float(without) > 0 and torch.allclose(with_cache, without, rtol=1e-5, atol=1e-7)
    assert len(cached.start_cache.rows) == 2 and cached.start_cache.size > 0
    small = StartCache(budget=1)  # beyond the budget nothing is kept and every step computes again
    forward, held = batch([0, 1, 2], 12)
    with torch.no_grad():
        _kl_to_start(trainer(small), model, forward, answer_logits(plain, model, forward, held), held)
    assert small.rows == {} and small.size == 0
