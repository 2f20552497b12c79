#!/usr/bin/env python3
"""The PyTorch peer of benches/decode.rs: one greedy decode step of a Llama-3-8B-shaped model
(random f16 weights; hidden 4096, FFN 14336, 32/8 heads of 128, vocabulary 128256), written
directly in PyTorch the way a careful user would: cuBLAS matmuls with the QKV and gate+up
projections fused, RMSNorm, rotate-half RoPE, a static KV cache per layer (written in place),
SDPA with enable_gqa over the T cached tokens plus the new one, arg-max on the device, and the
whole step captured in a CUDA graph and replayed.

Prints one markdown row per (B, T): median step time over --steps replays (CUDA events,
after warm-up), tokens/s, and the bytes a step must read (weights + KV) over that time.

  python3 scripts/decode_baseline.py --batch 8 --tokens 4096 16384 32768

With --prefill it is instead the peer of the prefill rows of benches/decode.rs: one prefill of
a T-token prompt per sequence (the same weights, SDPA with is_causal and enable_gqa over the
prompt, every layer's K and V written into a static cache of T tokens, logits of the last
token), timed with CUDA events after one warm-up prefill, with the peak of
torch.cuda.max_memory_allocated over the timed prefill beside the weights and the cache.

  python3 scripts/decode_baseline.py --prefill --batch 1 --tokens 32768
"""

import argparse
import statistics

import torch
import torch.nn.functional as F

DIM, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4096, 14336, 32, 8, 128, 128256
Q_DIM, KV_DIM = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM


def rms_norm(x, w, eps=1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope(x, cos, sin):
    # x [b, heads, n, hd]; cos, sin [1, 1, n, hd / 2]
    x0, x1 = x[..., : HEAD_DIM // 2], x[..., HEAD_DIM // 2 :]
    return torch.cat([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)


def rope_angles(positions, dt):
    """cos, sin [1, 1, n, hd / 2] of the f32 positions [n]."""
    inv = 500000.0 ** (-torch.arange(0, HEAD_DIM // 2, device=positions.device,
                                     dtype=torch.float32) * 2 / HEAD_DIM)
    angle = positions[:, None] * inv[None, :]
    return angle.cos().to(dt)[None, None], angle.sin().to(dt)[None, None]


def layer_forward(x, l, cos, sin, store, is_causal):
    """One decoder layer over x [b, n, dim]; store(k, v) writes the new keys and values
    [b, kv_heads, n, hd] into the layer's cache and returns the K and V to attend to."""
    b, n, _ = x.shape
    h = rms_norm(x, l["attn_norm"])
    q, k, v = (h @ l["wqkv"].t()).split([Q_DIM, KV_DIM, KV_DIM], dim=-1)
    q = rope(q.view(b, n, HEADS, HEAD_DIM).transpose(1, 2), cos, sin)
    k = rope(k.view(b, n, KV_HEADS, HEAD_DIM).transpose(1, 2), cos, sin)
    kc, vc = store(k, v.view(b, n, KV_HEADS, HEAD_DIM).transpose(1, 2))
    o = F.scaled_dot_product_attention(q, kc, vc, is_causal=is_causal, enable_gqa=True)
    x = x + o.transpose(1, 2).reshape(b, n, Q_DIM) @ l["wo"].t()
    h = rms_norm(x, l["ffn_norm"])
    g, u = (h @ l["w13"].t()).split([HIDDEN, HIDDEN], dim=-1)
    return x + (F.silu(g) * u) @ l["w2"].t()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--prefill", action="store_true", help="time a prefill instead of a step")
    a = p.parse_args()
    dev, dt = "cuda", torch.float16
    torch.manual_seed(0)

    def mat(rows, cols):
        return (torch.randn(rows, cols, device=dev, dtype=dt) * 0.02)

    layers = [
        dict(
            attn_norm=torch.ones(DIM, device=dev, dtype=dt),
            wqkv=mat(Q_DIM + 2 * KV_DIM, DIM),
            wo=mat(DIM, Q_DIM),
            ffn_norm=torch.ones(DIM, device=dev, dtype=dt),
            w13=mat(2 * HIDDEN, DIM),
            w2=mat(DIM, HIDDEN),
        )
        for _ in range(a.layers)
    ]
    embedding = mat(VOCAB, DIM)
    final_norm = torch.ones(DIM, device=dev, dtype=dt)
    lm_head = mat(VOCAB, DIM)
    weight_bytes = sum(t.numel() * 2 for l in layers for t in l.values()) + lm_head.numel() * 2
    if a.prefill:
        prefill(a, layers, embedding, final_norm, lm_head, weight_bytes)
        return
    print(f"\nPyTorch {torch.__version__} decode step, Llama-3-8B shape with {a.layers} layers, "
          f"f16, {torch.cuda.get_device_name()}\n")
    print("| peer | B | T | step ms (median) | tokens/s | GB read | GB/s |")
    print("|---|---|---|---|---|---|---|")
    b = a.batch
    for t in a.tokens:
        caches = [
            (torch.rand(b, KV_HEADS, t + 1, HEAD_DIM, device=dev, dtype=dt) * 2 - 1,
             torch.rand(b, KV_HEADS, t + 1, HEAD_DIM, device=dev, dtype=dt) * 2 - 1)
            for _ in range(a.layers)
        ]
        pos = torch.tensor([t], device=dev)
        cos, sin = rope_angles(torch.tensor([float(t)], device=dev), dt)
        tokens = torch.ones(b, dtype=torch.long, device=dev)

        def step():
            x = embedding[tokens].view(b, 1, DIM)
            for l, (kc, vc) in zip(layers, caches):
                x = layer_forward(x, l, cos, sin, lambda k, v, kc=kc, vc=vc:
                                  (kc.index_copy_(2, pos, k), vc.index_copy_(2, pos, v)),
                                  is_causal=False)
            logits = rms_norm(x.view(b, DIM), final_norm) @ lm_head.t()
            tokens.copy_(logits.argmax(-1))

        with torch.no_grad():
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            for _ in range(5):
                graph.replay()
            torch.cuda.synchronize()
            times = []
            for _ in range(a.steps):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                graph.replay()
                e1.record()
                torch.cuda.synchronize()
                times.append(e0.elapsed_time(e1))
        ms = statistics.median(times)
        kv_bytes = a.layers * 2 * b * KV_HEADS * (t + 1) * HEAD_DIM * 2
        gb = (weight_bytes + kv_bytes) / 1e9
        print(f"| PyTorch (cuBLAS, SDPA, CUDA graph) | {b} | {t} | {ms:.2f} | {b / ms * 1e3:.0f} "
              f"| {gb:.2f} | {gb / ms * 1e3:.0f} |", flush=True)
        del caches, graph
        torch.cuda.empty_cache()


def mean_ms(fn, reps, before=None):
    """Mean milliseconds of `reps` back-to-back calls of `fn` (CUDA events), after one warm-up
    call and `before()` (e.g. resetting the peak-memory statistics)."""
    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        if before is not None:
            before()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(reps):
            fn()
        e1.record()
        torch.cuda.synchronize()
    return e0.elapsed_time(e1) / reps


def prefill(a, layers, embedding, final_norm, lm_head, weight_bytes):
    dev, dt = "cuda", torch.float16
    print(f"\nPyTorch {torch.__version__} prefill, Llama-3-8B shape with {a.layers} layers, "
          f"f16, {torch.cuda.get_device_name()}; weights {weight_bytes / 1e9:.2f} GB\n")
    print("| peer | B | T | prefill s | prompt tokens/s | peak GB | weights + cache GB |")
    print("|---|---|---|---|---|---|---|")
    b = a.batch
    for t in a.tokens:
        caches = [
            (torch.empty(b, KV_HEADS, t, HEAD_DIM, device=dev, dtype=dt),
             torch.empty(b, KV_HEADS, t, HEAD_DIM, device=dev, dtype=dt))
            for _ in range(a.layers)
        ]
        cos, sin = rope_angles(torch.arange(t, device=dev, dtype=torch.float32), dt)
        tokens = torch.ones(b, t, dtype=torch.long, device=dev)

        def run():
            x = embedding[tokens]
            for l, (kc, vc) in zip(layers, caches):
                x = layer_forward(x, l, cos, sin, lambda k, v, kc=kc, vc=vc:
                                  (kc.copy_(k), vc.copy_(v)), is_causal=True)
            return (rms_norm(x[:, -1], final_norm) @ lm_head.t()).argmax(-1)

        sec = mean_ms(run, 1, before=torch.cuda.reset_peak_memory_stats) / 1e3
        peak = torch.cuda.max_memory_allocated() / 1e9
        cache_gb = a.layers * 2 * b * KV_HEADS * t * HEAD_DIM * 2 / 1e9
        print(f"| PyTorch (cuBLAS, SDPA is_causal) | {b} | {t} | {sec:.3f} | {b * t / sec:.0f} "
              f"| {peak:.2f} | {weight_bytes / 1e9 + cache_gb:.2f} |", flush=True)
        del caches
        torch.cuda.empty_cache()
        # The attention of one layer alone (SDPA, causal, GQA), the peer of the prompt
        # attention kernel's row of benches/decode.rs.
        q = torch.randn(b, HEADS, t, HEAD_DIM, device=dev, dtype=dt)
        k = torch.randn(b, KV_HEADS, t, HEAD_DIM, device=dev, dtype=dt)
        v = torch.randn(b, KV_HEADS, t, HEAD_DIM, device=dev, dtype=dt)
        ms = mean_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                            enable_gqa=True), 5)
        flops = 4 * b * HEADS * HEAD_DIM * t * (t + 1) / 2
        print(f"| SDPA is_causal, one layer's attention | {b} | {t} | {ms:.2f} ms "
              f"| {flops / ms / 1e9:.0f} TFLOP/s | - | - |", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
        # The projections alone (cuBLAS), the peer of the decode bench's matmul sweep.
        for name, n, kk in [("QKV", 6144, 4096), ("output", 4096, 4096),
                            ("gate+up", 28672, 4096), ("down", 4096, 14336)]:
            x = torch.randn(b * t, kk, device=dev, dtype=dt)
            w = torch.randn(n, kk, device=dev, dtype=dt) * 0.02
            ms = mean_ms(lambda: x @ w.t(), 3)
            print(f"| cuBLAS {name} {n} x {kk} | {b} | {t} | {ms:.2f} ms "
                  f"| {2 * b * t * n * kk / ms / 1e9:.0f} TFLOP/s | - | - |", flush=True)
            del x, w
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
