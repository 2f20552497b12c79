"""Dense decode attention through PyTorch SDPA (cuDNN / flash backends) on the GPU machine:
the strongest dense baseline we can run there. Same shape as benches/attention.rs.

Times CUDA-graph replays with CUDA events, rotating several independent KV sets so that no
replay finds the previous one's data in L2; prints the median microseconds per call and the
effective bandwidth on the KV bytes.

    python3 scripts/sdpa_baseline.py [--batch 8] [--tokens 32768]
"""
import argparse
import statistics

import torch
import torch.nn.functional as F


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--sets", type=int, default=3)
    args = p.parse_args()
    b, t, hq, hkv, d = args.batch, args.tokens, args.q_heads, args.kv_heads, args.head_dim
    dev = torch.device("cuda")
    torch.manual_seed(0)
    sets = []
    for _ in range(args.sets):
        k = torch.randn(b, hkv, t, d, device=dev, dtype=torch.float16)
        v = torch.randn(b, hkv, t, d, device=dev, dtype=torch.float16)
        q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.float16)
        sets.append((q, k, v))

    def step(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    # Check against an f32 reference once.
    q, k, v = sets[0]
    ref = torch.softmax((q.float() @ k.float().repeat_interleave(hq // hkv, 1).transpose(-1, -2)) / d**0.5, -1) @ v.float().repeat_interleave(hq // hkv, 1)
    err = ((step(q, k, v).float() - ref).norm() / ref.norm()).item()

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            for s in sets:
                step(*s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    reps = 10
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for s in sets:
                step(*s)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / (reps * len(sets)))
    med = statistics.median(times)
    kv_bytes = 2 * b * hkv * t * d * 2
    print(f"SDPA dense decode: B={b} T={t} Hq/Hkv={hq}/{hkv} d={d} f16: {med:.1f} us/call "
          f"(median of 20 graph replays of {reps * len(sets)} calls), KV bytes {kv_bytes}, "
          f"{kv_bytes / med / 1e3:.0f} GB/s, rel err vs f32 {err:.2e}")


if __name__ == "__main__":
    main()
