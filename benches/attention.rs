//! Decode attention, dense vs sparse, on the backend the features select (`cuda`, else wgpu).
//!
//! Shape (the first BENCHMARKS.md row): H_q/H_kv = 32/8, head_dim 128, f16 (f32 where the
//! device has no f16), B = 8, T = 32768 tokens per sequence, sparsity 0.7 for K and V, a dense
//! window of 32. The sparse cache is made from the same random rows by the prune+compress
//! kernel. The KV data (about 1 GB dense) is far larger than any L2, so no rotation is needed.
//!
//! Timing: criterion's `iter_custom`, with the device synchronised before starting the clock
//! and after the last launch, so it measures GPU work rather than queueing. After criterion,
//! the bench prints a markdown table from its own measurement: the median over 15 batches of
//! 20 back-to-back calls (after warm-up), with bytes read and effective bandwidth.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::needless_range_loop)]

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use sparsekv::format::{HeadDim, Sparsity, keep_count, layout};
use sparsekv::kernels::cubecl::prelude::*;
use sparsekv::kernels::cubecl::server::Handle;
use sparsekv::kernels::{
    AttentionArgs, CompressArgs, DenseCacheArgs, FloatElement, SparseSegmentArgs, decode_attention,
    prune_compress, supports_type,
};

#[cfg(feature = "cuda")]
type Rt = sparsekv::kernels::cubecl::cuda::CudaRuntime;
#[cfg(not(feature = "cuda"))]
type Rt = sparsekv::kernels::cubecl::wgpu::WgpuRuntime;

const Q_HEADS: usize = 32;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const WINDOW: usize = 32;

/// Fast uniform [-1, 1) values (xorshift), converted to `F`.
fn random<F: FloatElement>(n: usize, seed: u64) -> Vec<F> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            F::from_f32((s >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect()
}

fn sync(client: &ComputeClient<Rt>) {
    sparsekv::kernels::cubecl::future::block_on(client.sync()).expect("device sync");
}

struct Setup {
    batch: usize,
    tokens: usize,
    sparsity: Sparsity,
    q: Handle,
    out: Handle,
    dense_k: Handle,
    dense_v: Handle,
    win_k: Handle,
    win_v: Handle,
    bits_k: Handle,
    bits_v: Handle,
    vals_k: Handle,
    vals_v: Handle,
    bitmap_stride: usize,
    values_stride: usize,
}

impl Setup {
    fn new<F: FloatElement>(
        client: &ComputeClient<Rt>,
        batch: usize,
        tokens: usize,
        s: f64,
    ) -> Self {
        let hd = HeadDim::new(HEAD_DIM).expect("valid");
        let sparsity = Sparsity::new(s).expect("valid");
        let streams = batch * KV_HEADS;
        let up = |v: Vec<F>| client.create_from_slice(F::as_bytes(&v));
        let dense_k = up(random::<F>(streams * tokens * HEAD_DIM, 1));
        let dense_v = up(random::<F>(streams * tokens * HEAD_DIM, 2));
        let win_k = up(random::<F>(streams * WINDOW * HEAD_DIM, 3));
        let win_v = up(random::<F>(streams * WINDOW * HEAD_DIM, 4));
        let q = up(random::<F>(batch * Q_HEADS * HEAD_DIM, 5));
        let out = client.empty(batch * Q_HEADS * HEAD_DIM * F::size_bytes());
        let comp = tokens - WINDOW;
        let cap = layout::aligned_capacity(comp);
        let keep = keep_count(sparsity, hd);
        let bitmap_stride = layout::bitmap_words(cap, hd);
        let values_stride = cap * keep;
        let bits_k = client.empty(streams * bitmap_stride * 4);
        let bits_v = client.empty(streams * bitmap_stride * 4);
        let vals_k = client.empty(streams * values_stride * F::size_bytes());
        let vals_v = client.empty(streams * values_stride * F::size_bytes());
        let zeros = vec![0u32; batch];
        let counts = vec![comp as u32; batch];
        for (src, bits, vals) in [(&dense_k, &bits_k, &vals_k), (&dense_v, &bits_v, &vals_v)] {
            let args = CompressArgs {
                sequences: batch,
                kv_heads: KV_HEADS,
                head_dim: hd,
                sparsity,
                src_stride: tokens * HEAD_DIM,
                src_start: &zeros,
                dst_start: &zeros,
                counts: &counts,
                bitmap_stride,
                values_stride,
            };
            prune_compress::<Rt, F>(client, &args, src, bits, vals).expect("compress");
        }
        sync(client);
        Setup {
            batch,
            tokens,
            sparsity,
            q,
            out,
            dense_k,
            dense_v,
            win_k,
            win_v,
            bits_k,
            bits_v,
            vals_k,
            vals_v,
            bitmap_stride,
            values_stride,
        }
    }

    fn run<F: FloatElement>(&self, client: &ComputeClient<Rt>, sparse: bool) {
        let hd = HeadDim::new(HEAD_DIM).expect("valid");
        let comp = vec![(self.tokens - WINDOW) as u32; self.batch];
        let win = vec![WINDOW as u32; self.batch];
        let all = vec![self.tokens as u32; self.batch];
        let zeros = vec![0u32; self.batch];
        let result = if sparse {
            let segment = SparseSegmentArgs {
                k_bitmap: &self.bits_k,
                k_values: &self.vals_k,
                v_bitmap: &self.bits_v,
                v_values: &self.vals_v,
                bitmap_stride: self.bitmap_stride,
                k_values_stride: self.values_stride,
                v_values_stride: self.values_stride,
                k_sparsity: self.sparsity,
                v_sparsity: self.sparsity,
            };
            let args = AttentionArgs {
                batch: self.batch,
                q_heads: Q_HEADS,
                kv_heads: KV_HEADS,
                head_dim: hd,
                compressed_lens: &comp,
                window_lens: &win,
            };
            let window = DenseCacheArgs {
                k: &self.win_k,
                v: &self.win_v,
                stride: WINDOW * HEAD_DIM,
            };
            decode_attention::<Rt, F>(client, &args, &self.q, Some(&segment), &window, &self.out)
        } else {
            let args = AttentionArgs {
                batch: self.batch,
                q_heads: Q_HEADS,
                kv_heads: KV_HEADS,
                head_dim: hd,
                compressed_lens: &zeros,
                window_lens: &all,
            };
            let window = DenseCacheArgs {
                k: &self.dense_k,
                v: &self.dense_v,
                stride: self.tokens * HEAD_DIM,
            };
            decode_attention::<Rt, F>(client, &args, &self.q, None, &window, &self.out)
        };
        result.expect("launch");
    }

    /// Bytes a call must read: every K/V byte of the cache (bitmaps, values, window) and the
    /// queries, plus the output written.
    fn bytes(&self, sparse: bool, elem: usize) -> usize {
        let streams = self.batch * KV_HEADS;
        let qo = 2 * self.batch * Q_HEADS * HEAD_DIM * elem;
        if sparse {
            let hd = HeadDim::new(HEAD_DIM).expect("valid");
            let comp = self.tokens - WINDOW;
            let keep = keep_count(self.sparsity, hd);
            let per_stream = 2 * (layout::bitmap_words(comp, hd) * 4 + comp * keep * elem)
                + 2 * WINDOW * HEAD_DIM * elem;
            streams * per_stream + qo
        } else {
            streams * 2 * self.tokens * HEAD_DIM * elem + qo
        }
    }
}

fn median_call_time<F: FloatElement>(
    client: &ComputeClient<Rt>,
    setup: &Setup,
    sparse: bool,
) -> Duration {
    for _ in 0..10 {
        setup.run::<F>(client, sparse);
    }
    sync(client);
    let mut per_call: Vec<Duration> = (0..15)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..20 {
                setup.run::<F>(client, sparse);
            }
            sync(client);
            t.elapsed() / 20
        })
        .collect();
    per_call.sort();
    per_call[per_call.len() / 2]
}

fn bench_typed<F: FloatElement>(c: &mut Criterion, client: &ComputeClient<Rt>) {
    let (batch, tokens, s) = (8, 32768, 0.7);
    let setup = Setup::new::<F>(client, batch, tokens, s);
    let mut group = c.benchmark_group(format!("decode_attention/{}", F::name()));
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3));
    for sparse in [false, true] {
        let name = if sparse {
            format!("sparse_s{s}")
        } else {
            "dense".to_string()
        };
        group.bench_function(format!("{name}/B{batch}/T{tokens}"), |b| {
            b.iter_custom(|iters| {
                sync(client);
                let t = Instant::now();
                for _ in 0..iters {
                    setup.run::<F>(client, sparse);
                }
                sync(client);
                t.elapsed()
            })
        });
    }
    group.finish();

    println!(
        "\n| kernel | B | T | dtype | us/call (median) | bytes read | effective GB/s | speedup vs dense |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let dense = median_call_time::<F>(client, &setup, false);
    for sparse in [false, true] {
        let t = if sparse {
            median_call_time::<F>(client, &setup, true)
        } else {
            dense
        };
        let bytes = setup.bytes(sparse, F::size_bytes());
        println!(
            "| {} | {batch} | {tokens} | {} | {:.1} | {} | {:.0} | {:.2}x |",
            if sparse {
                format!("sparse s={s}")
            } else {
                "dense".into()
            },
            F::name(),
            t.as_secs_f64() * 1e6,
            bytes,
            bytes as f64 / t.as_secs_f64() / 1e9,
            dense.as_secs_f64() / t.as_secs_f64()
        );
    }
}

fn attention(c: &mut Criterion) {
    let client = Rt::client(&Default::default());
    if supports_type::<Rt, half::f16>(&client) {
        bench_typed::<half::f16>(c, &client);
    } else {
        bench_typed::<f32>(c, &client);
    }
}

criterion_group!(benches, attention);
criterion_main!(benches);
