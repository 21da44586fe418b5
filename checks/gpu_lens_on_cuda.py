"""On CUDA: PR 1's fresh lens is the norm's forward on each entry (torch.equal) at every target;
its speed against 4.3.0's per-entry loop; PR 3's kl_to_final against a naive KL from the tool's
own full-vocabulary log-probs, and its cost.

Not collected by pytest (CI has no GPU): run it by hand where CUDA is, with the fork importable,
`python checks/gpu_lens_on_cuda.py`. Its output on an H200 is in benchmarks/RESULTS.md.
"""
import statistics, sys, time, warnings
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformer_lens.model_bridge.sources import build_bridge_from_module
from transformer_lens.tools.analysis import logit_lens

warnings.simplefilter("ignore")
dev = "cuda"
print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(), flush=True)


def bridge(kind, dtype, compat=False, big=False):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = (
            GPT2Config(n_layer=12, n_embd=768, n_head=12)
            if big
            else GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=1000)
        )
        hf, arch = GPT2LMHeadModel(cfg), "GPT2LMHeadModel"
    else:
        cfg = LlamaConfig(
            num_hidden_layers=4,
            hidden_size=512,
            intermediate_size=1024,
            num_attention_heads=8,
            num_key_value_heads=4,
            vocab_size=1000,
        )
        hf, arch = LlamaForCausalLM(cfg), "LlamaForCausalLM"
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "ln" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    m = build_bridge_from_module(
        hf.to(dev, dtype).eval(), arch, hf_config=cfg, device=dev, dtype=dtype
    )
    if compat:
        m.enable_compatibility_mode()
    return m


def timed(f, n=20):
    for _ in range(3):
        f()
    t = []
    for _ in range(n):
        torch.cuda.synchronize()
        s = time.perf_counter()
        f()
        torch.cuda.synchronize()
        t.append((time.perf_counter() - s) * 1000)
    return statistics.median(t)


print("== PR 1: recompute_ln=True == the target norm's forward on each entry, on CUDA", flush=True)
for kind, dtype, compat in [
    ("gpt2", torch.float32, False),
    ("gpt2", torch.bfloat16, False),
    ("gpt2", torch.float32, True),
    ("llama", torch.float32, False),
    ("llama", torch.bfloat16, False),
    ("llama", torch.float16, False),
]:
    m = bridge(kind, dtype, compat)
    tokens = torch.randint(0, 1000, (4, 64), device=dev)
    with torch.no_grad():
        _, cache = m.run_with_cache(tokens)
        n = m.cfg.n_layers
        results = []
        for layer, mlp in [(L, x) for L in range(n) for x in (False, True)] + [(n, False)]:
            stack = cache.accumulated_resid(layer=layer, mlp_input=mlp)
            fresh = cache.apply_ln_to_stack(stack, layer=layer, mlp_input=mlp, recompute_ln=True)
            norm = (
                m.ln_final if layer == n else (m.blocks[layer].ln2 if mlp else m.blocks[layer].ln1)
            )
            results.append(torch.equal(fresh, torch.stack([norm(e) for e in stack])))
    print(
        f"{kind:6s} {str(dtype)[6:]:9s} {'compat' if compat else 'raw   '} targets {len(results)}: all torch.equal {all(results)}",
        flush=True,
    )

print(
    "== PR 1: speed on CUDA, apply_ln_to_stack(recompute_ln=True) vs 4.3.0's per-entry ln_final loop",
    flush=True,
)
for dtype in (torch.float32, torch.bfloat16):
    for compat in (False, True):
        m = bridge("gpt2", dtype, compat, big=True)
        with torch.no_grad():
            _, cache = m.run_with_cache(torch.randint(0, 50257, (32, 256), device=dev))
            stack = cache.accumulated_resid()
            fresh = lambda: cache.apply_ln_to_stack(stack, recompute_ln=True)
            loop = lambda: torch.stack([m.ln_final(e) for e in stack])
            eq = torch.equal(fresh(), loop())
            tf, tl = timed(fresh), timed(loop)
        print(
            f"GPT-2 small {str(dtype)[6:]:9s} {'compat' if compat else 'raw   '} stack {tuple(stack.shape)}: fresh {tf:.2f} ms, 4.3.0 loop {tl:.2f} ms, torch.equal {eq}",
            flush=True,
        )
        del cache, stack

print("== PR 3: kl_to_final on CUDA vs naive KL from the tool's own log-probs; cost", flush=True)
for dtype in (torch.float32, torch.bfloat16):
    m = bridge("gpt2", dtype, big=True)
    tokens = torch.randint(0, 50257, (4, 64), device=dev)
    with torch.no_grad():
        _, cache = m.run_with_cache(tokens)
        full = logit_lens(cache, positions=None, return_type="log_probs").values.float()
        out = (
            logit_lens(cache, positions=None, layers=[-1], return_type="log_probs")
            .values[0]
            .float()
        )
        naive = (out.exp() * (out - full)).sum(-1)
        r = logit_lens(cache, positions=None, kl_to_final=True, targets=[11, 13])
        kl = r.readout.kl_to_final.float()
        err = (kl - naive).abs().max().item()
        t0 = timed(lambda: logit_lens(cache, positions=None, targets=[11, 13]), 10)
        t1 = timed(
            lambda: logit_lens(cache, positions=None, targets=[11, 13], kl_to_final=True), 10
        )
    print(
        f"GPT-2 small {str(dtype)[6:]:9s} 4x64, vocab 50257: max |kl - naive| {err:.2e} (max kl {naive.max().item():.2f}), final entry kl max {kl[-1].abs().max().item():.1e}; no KL {t0:.1f} ms, KL {t1:.1f} ms ({t1/t0:.2f}x)",
        flush=True,
    )

    tk0 = timed(lambda: logit_lens(cache, positions=None, top_k=5), 10)
    tk1 = timed(lambda: logit_lens(cache, positions=None, top_k=5, kl_to_final=True), 10)
    print(f"   top-5: no KL {tk0:.1f} ms, KL {tk1:.1f} ms ({tk1/tk0:.2f}x)", flush=True)
