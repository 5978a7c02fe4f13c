"""Correctness of the CUDA fast path on the GPU, against float32 references (run before any timing).

1. Varlen FlashAttention (the kernel `trainer/cuda_fast.py` calls) against float32 causal attention run example
   by example: outputs and the gradients of q, k, v, for both models' head layouts (32/8 and 9/3 heads).
2. Fused LoRA linear against PEFT's LoRA forward, both against float32, outputs and LoRA gradients.
3. The whole step on the same 8 examples: float32 reference (padded, SDPA, PEFT) vs the bf16 baseline path
   (padded, SDPA, PEFT) vs the bf16 fast path (packed, varlen, fused LoRA, Liger): loss and LoRA gradients.
   The fast path passes when its error against float32 is no larger than about the baseline's own bf16 error.
Writes a JSON report; exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def check_attention(torch, cuda_fast) -> list[dict]:
    out = []
    lengths = [1, 17, 600, 1024, 2048, 3, 333, 900]
    for hq, hkv in ((32, 8), (9, 3)):
        g = torch.Generator(device="cuda").manual_seed(0)
        total = sum(lengths)
        q, k, v = (torch.randn(total, h, 64, device="cuda", generator=g) for h in (hq, hkv, hkv))
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        dout = torch.randn(total, hq, 64, device="cuda", generator=g)

        def grads(fn, dtype):
            qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
            o = fn(qq, kk, vv)
            o.backward(dout.to(dtype))
            return o.detach(), qq.grad, kk.grad, vv.grad

        ref = grads(lambda a, b, c: cuda_fast._per_example_sdpa(a, b, c, cu, 64**-0.5), torch.float64)
        got = grads(lambda a, b, c: cuda_fast._flash_varlen(a, b, c, cu, cu, max(lengths), max(lengths),
                                                            64**-0.5, 0.0), torch.bfloat16)
        errs = {n: rel(x, y) for n, x, y in zip(("out", "dq", "dk", "dv"), got, ref)}
        out.append({"check": f"varlen attention {hq}/{hkv} heads", **errs, "ok": max(errs.values()) < 2e-2})
    return out


def check_fused_lora(torch, peft, cuda_fast) -> list[dict]:
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(2048, 8192, bias=False))
    model = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, target_modules=["0"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(4096, 2048)
    g = torch.randn(4096, 8192)

    def run(dtype, fused):
        m = copy.deepcopy(model).cuda()
        for n, p in m.named_parameters():
            p.data = p.data.to(dtype) if "lora_" not in n else p.data.float()  # adapters fp32, as PEFT keeps them
        cuda_fast.disable_fused_lora()
        if fused:
            cuda_fast.enable_fused_lora()
        xx = x.cuda().to(dtype).requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype != torch.float32):
            y = m(xx)
        y.backward(g.cuda().to(y.dtype))
        cuda_fast.disable_fused_lora()
        lora = {("lora_A" if "lora_A" in n else "lora_B"): p.grad for n, p in m.named_parameters() if p.requires_grad}
        return y.detach(), xx.grad, lora["lora_A"], lora["lora_B"]

    ref = run(torch.float32, False)
    peft_bf16 = run(torch.bfloat16, False)
    fused = run(torch.bfloat16, True)
    rows = []
    for name, got in (("peft bf16", peft_bf16), ("fused bf16", fused)):
        errs = {n: rel(a, b) for n, a, b in zip(("out", "dx", "dA", "dB"), got, ref)}
        rows.append({"check": f"LoRA linear 2048->8192, {name} vs fp32", **errs, "ok": max(errs.values()) < 3e-2})
    return rows


def check_full_step(torch, transformers, peft, cuda_fast, arch: str, dev: str = "cuda") -> list[dict]:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from benchmarks.gpu_data import make_examples
    from benchmarks.gpu_train_speed import ARCHS

    cfg = transformers.LlamaConfig(**ARCHS[arch])
    torch.manual_seed(1234)
    with torch.device(dev):
        ref_model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    ref_model.set_attn_implementation("sdpa")
    ref_model = peft.get_peft_model(ref_model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                               task_type="CAUSAL_LM"))
    torch.manual_seed(5)
    for n, p in ref_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.01)
    rows = [{k: v[:1024] for k, v in r.items()} for r in make_examples(8, cfg.vocab_size, seed=3)]
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(rows)
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    flat.pop("seq_idx", None)

    def step(model, batch, autocast):
        model.zero_grad(set_to_none=True)
        batch = {k: v.to(dev) if hasattr(v, "to") else v for k, v in batch.items()}
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for n, p in model.named_parameters() if p.requires_grad])
        return loss.detach().float(), grads

    def to_bf16(model):
        m = copy.deepcopy(model)
        for n, p in m.named_parameters():
            p.data = p.data.to(torch.bfloat16) if "lora_" not in n else p.data
        return m

    ref_loss, ref_g = step(ref_model, padded, False)
    base_model = to_bf16(ref_model)
    base_loss, base_g = step(base_model, padded, True)
    del base_model
    fast_model = to_bf16(ref_model)
    del ref_model
    cuda_fast.use_varlen_attention(fast_model)
    if dev == "cuda":
        cuda_fast.apply_liger(fast_model)
    else:
        cuda_fast._FUSE_ON_CPU = True
    cuda_fast.enable_fused_lora()
    fast_loss, fast_g = step(fast_model, flat, True)
    cuda_fast.disable_fused_lora()
    base_err = {"loss": rel(base_loss, ref_loss), "grad": rel(base_g, ref_g)}
    fast_err = {"loss": rel(fast_loss, ref_loss), "grad": rel(fast_g, ref_g)}
    ok = all(fast_err[k] <= max(2 * base_err[k], 5e-3) for k in fast_err)
    return [{
        "check": f"full step {arch}, 8 examples", "loss_fp32": float(ref_loss), "loss_baseline_bf16": float(base_loss),
        "loss_fast_bf16": float(fast_loss), "baseline_vs_fp32": base_err, "fast_vs_fp32": fast_err,
        "fast_vs_baseline": {"loss": rel(fast_loss, base_loss), "grad": rel(fast_g, base_g)}, "ok": ok,
    }]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_checks.json")
    p.add_argument("--archs", default="smollm2,llama1b")
    p.add_argument("--step-only", help="run the full-step check of one architecture and print its JSON")
    ns = p.parse_args(argv)
    import peft
    import torch
    import transformers

    from trainer import cuda_fast

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if ns.step_only:
        print("STEP", json.dumps(check_full_step(torch, transformers, peft, cuda_fast, ns.step_only, dev)[0]))
        return 0

    def step_in_subprocess(arch):
        # Liger patches transformers' Llama module for the whole process: a fresh one keeps the baseline clean
        import subprocess

        proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_checks", "--step-only", arch],
                              capture_output=True, text=True, timeout=300)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("STEP ")]
        if not lines:
            raise RuntimeError(proc.stderr[-2000:])
        return [json.loads(lines[-1][5:])]

    parts = [("lora", lambda: check_fused_lora(torch, peft, cuda_fast))] if dev == "cuda" else []
    if dev == "cuda":
        parts.insert(0, ("attention", lambda: check_attention(torch, cuda_fast)))
    parts += [(f"step-{a}", lambda a=a: step_in_subprocess(a)) for a in ns.archs.split(",") if a]
    results = []
    for name, fn in parts:
        try:
            results += fn()
        except Exception as exc:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            results.append({"check": name, "error": f"{type(exc).__name__}: {exc}", "ok": False})
        print(json.dumps(results[-1]), flush=True)
    with open(ns.out, "w") as f:
        json.dump(results, f, indent=1)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
