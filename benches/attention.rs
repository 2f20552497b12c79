//! Decode attention, dense vs sparse, on the backend the features select (`cuda`, else wgpu),
//! against a read-only ceiling (a reduction) and the device-to-device copy, measured in the same
//! run.
//!
//! Shapes: H_q/H_kv = 32/8, head_dim 128, f16 (f32 where the device has no f16), a dense
//! window of 32, B in {1, 8, 32} x T in {1K, 4K, 16K, 32K, 128K}, plus head_dim 64 and 256 at
//! B = 8, T = 32K; sparsity 0.5 and 0.7 for K and V. Shapes whose dense K tensor would pass
//! 2^31 elements (B = 32 at 128K) are skipped: the kernels index with 32-bit integers. The sparse caches are made from the same rows by the
//! prune+compress kernel. Small caches are rotated (several independent copies, at least
//! 256 MB in all) so that L2 does not hold the KV between calls.
//!
//! Timing: the device is synchronised before the clock starts and after the last launch.
//! Criterion (`iter_custom`) runs the B = 8 shapes; the printed markdown table, for every
//! shape, has the median over 15 batches of 200 back-to-back calls after 10 warm-up calls, the
//! bytes a call must read (bitmaps, values, window or dense K/V, queries, output), the
//! effective bandwidth and its fraction of the read-only ceiling, and the speedup vs dense; its
//! rows come as they are measured (criterion's lines fall between them: `grep '^|'`).
//!
//! `SPARSEKV_BENCH_QUICK=1` runs only B = 1 at 1K and 4K (for software adapters);
//! `SPARSEKV_BENCH_ONLY=8x16384,8x32768x256` only those shapes (`BxT` at head_dim 128, or
//! `BxTxD`), without criterion (for profilers and short runs); `SPARSEKV_BENCH_KERNEL=simt` or
//! `=tensor-core` runs every row on that split kernel instead of the default (`Auto`);
//! `SPARSEKV_BENCH_WINDOW=96` gives the sparse rows that many dense window tokens instead of 32
//! (a decode step's window holds 32 to 96 tokens with the cache's default chunk of 64).

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{
    Rt, backend_name, calls_per_batch_or, copy_bandwidth, median_call_times_in_batches, quick,
    random_handle, read_bandwidth, sync,
};
use criterion::{Criterion, criterion_group, criterion_main};
use sparsekv::format::{HeadDim, Sparsity, keep_count, layout};
use sparsekv::kernels::cubecl::prelude::*;
use sparsekv::kernels::cubecl::server::Handle;
use sparsekv::kernels::{
    AttentionArgs, CompressArgs, CompressTarget, DecodeKernel, DenseCacheArgs, FloatElement,
    SparseSegmentArgs, decode_attention_with, prune_compress, supports_type,
};

const Q_HEADS: usize = 32;
const KV_HEADS: usize = 8;
/// The head dimension of the main sweep; `EXTRA_HEAD_DIMS` get one row each at B = 8, T = 32K.
const HEAD_DIM: usize = 128;
const EXTRA_HEAD_DIMS: [usize; 2] = [64, 256];
/// Back-to-back calls per timed batch of the table unless `SPARSEKV_BENCH_CALLS` says
/// otherwise. A call at B = 1 lasts 15-30 us and CubeCL 0.10 hands launches to its device
/// thread 32 at a time, so a batch of 20 is issued before the device starts and times issuing
/// and running one after the other; 200 times them overlapped, as a decode loop runs them.
const CALLS_PER_BATCH: usize = 200;

/// Dense window tokens of the sparse rows unless `SPARSEKV_BENCH_WINDOW` says otherwise.
const WINDOW: usize = 32;
const SPARSITIES: [f64; 2] = [0.5, 0.7];
/// Bytes of KV the rotated copies of a small cache add up to, at least.
const ROTATION_BYTES: usize = 256 << 20;

/// Dense window tokens of the sparse rows (`SPARSEKV_BENCH_WINDOW`, else [`WINDOW`]).
fn window() -> usize {
    std::env::var("SPARSEKV_BENCH_WINDOW")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(WINDOW)
}

/// One cache: dense K/V of all tokens, and for each sparsity the same rows compressed (all
/// but the window) plus the window.
struct CacheSet {
    dense_k: Handle,
    dense_v: Handle,
    win_k: Handle,
    win_v: Handle,
    /// Per sparsity: K bitmap, V bitmap, K values, V values.
    compressed: Vec<[Handle; 4]>,
}

struct Shape {
    batch: usize,
    tokens: usize,
    head_dim: usize,
}

impl Shape {
    fn streams(&self) -> usize {
        self.batch * KV_HEADS
    }
    fn compressed_tokens(&self) -> usize {
        self.tokens - window()
    }
    /// Tokens per compressed stream.
    fn capacity(&self) -> usize {
        layout::aligned_capacity(self.compressed_tokens())
    }
    fn bitmap_stride(&self) -> usize {
        layout::bitmap_words(self.capacity(), HeadDim::new(self.head_dim).expect("valid"))
    }
    fn values_stride(&self, s: Sparsity) -> usize {
        self.capacity() * keep_count(s, HeadDim::new(self.head_dim).expect("valid"))
    }

    /// Bytes a call must read and write: K/V (compressed or dense), queries and output.
    fn bytes(&self, sparsity: Option<Sparsity>, elem: usize) -> usize {
        let qo = 2 * self.batch * Q_HEADS * self.head_dim * elem;
        let hd = HeadDim::new(self.head_dim).expect("valid");
        let per_stream = match sparsity {
            Some(s) => {
                let comp = self.compressed_tokens();
                2 * (layout::bitmap_words(comp, hd) * 4 + comp * keep_count(s, hd) * elem)
                    + 2 * window() * self.head_dim * elem
            }
            None => 2 * self.tokens * self.head_dim * elem,
        };
        self.streams() * per_stream + qo
    }

    fn make_set<F: FloatElement>(&self, client: &ComputeClient<Rt>, seed: u32) -> CacheSet {
        let hd = HeadDim::new(self.head_dim).expect("valid");
        let streams = self.streams();
        let dense_k = random_handle::<F>(client, streams * self.tokens * self.head_dim, seed);
        let dense_v = random_handle::<F>(client, streams * self.tokens * self.head_dim, seed + 1);
        let win_k = random_handle::<F>(client, streams * window() * self.head_dim, seed + 2);
        let win_v = random_handle::<F>(client, streams * window() * self.head_dim, seed + 3);
        let zeros = vec![0u32; self.batch];
        let counts = vec![self.compressed_tokens() as u32; self.batch];
        let compressed = SPARSITIES
            .iter()
            .map(|&s| {
                let sparsity = Sparsity::new(s).expect("valid");
                let (bitmap_stride, values_stride) =
                    (self.bitmap_stride(), self.values_stride(sparsity));
                let bits = || client.empty(streams * bitmap_stride * 4);
                let vals = || client.empty(streams * values_stride * F::size_bytes());
                let set = [bits(), bits(), vals(), vals()];
                let args = CompressArgs {
                    sequences: self.batch,
                    kv_heads: KV_HEADS,
                    head_dim: hd,
                    src_stride: self.tokens * self.head_dim,
                    src_start: &zeros,
                    dst_start: &zeros,
                    counts: &counts,
                    capacity: self.capacity(),
                };
                let targets = [(&dense_k, &set[0], &set[2]), (&dense_v, &set[1], &set[3])].map(
                    |(src, bitmap, values)| CompressTarget {
                        src,
                        bitmap,
                        values,
                        sparsity,
                    },
                );
                prune_compress::<Rt, F>(client, &args, &targets).expect("compress");
                set
            })
            .collect();
        sync(client);
        CacheSet {
            dense_k,
            dense_v,
            win_k,
            win_v,
            compressed,
        }
    }

    /// One decode-attention call over `set`: dense (`which = None`) or compressed at
    /// `SPARSITIES[which]`.
    fn run<F: FloatElement>(
        &self,
        client: &ComputeClient<Rt>,
        set: &CacheSet,
        q: &Handle,
        out: &Handle,
        which: Option<usize>,
    ) {
        let hd = HeadDim::new(self.head_dim).expect("valid");
        let b = self.batch;
        let result = match which {
            Some(i) => {
                let sparsity = Sparsity::new(SPARSITIES[i]).expect("valid");
                let [kb, vb, kv, vv] = &set.compressed[i];
                let segment = SparseSegmentArgs {
                    k_bitmap: kb,
                    k_values: kv,
                    v_bitmap: vb,
                    v_values: vv,
                    bitmap_stride: self.bitmap_stride(),
                    k_values_stride: self.values_stride(sparsity),
                    v_values_stride: self.values_stride(sparsity),
                    k_sparsity: sparsity,
                    v_sparsity: sparsity,
                };
                let comp = vec![self.compressed_tokens() as u32; b];
                let win = vec![window() as u32; b];
                let args = AttentionArgs {
                    batch: b,
                    q_heads: Q_HEADS,
                    kv_heads: KV_HEADS,
                    head_dim: hd,
                    compressed_lens: &comp,
                    window_lens: &win,
                    row_sequences: None,
                };
                let window = DenseCacheArgs {
                    k: &set.win_k,
                    v: &set.win_v,
                    stride: window() * self.head_dim,
                };
                decode_attention_with::<Rt, F>(
                    client,
                    &args,
                    q,
                    Some(&segment),
                    &window,
                    out,
                    bench_kernel(),
                )
            }
            None => {
                let zeros = vec![0u32; b];
                let all = vec![self.tokens as u32; b];
                let args = AttentionArgs {
                    batch: b,
                    q_heads: Q_HEADS,
                    kv_heads: KV_HEADS,
                    head_dim: hd,
                    compressed_lens: &zeros,
                    window_lens: &all,
                    row_sequences: None,
                };
                let window = DenseCacheArgs {
                    k: &set.dense_k,
                    v: &set.dense_v,
                    stride: self.tokens * self.head_dim,
                };
                decode_attention_with::<Rt, F>(client, &args, q, None, &window, out, bench_kernel())
            }
        };
        result.expect("launch");
    }
}

/// The split kernel of every row: `SPARSEKV_BENCH_KERNEL=simt`, `=tensor-core` or `=sliced`
/// measures that kernel instead of the default (`Auto`).
fn bench_kernel() -> DecodeKernel {
    match std::env::var("SPARSEKV_BENCH_KERNEL").as_deref() {
        Ok("tensor-core") => DecodeKernel::TensorCore,
        Ok("simt") => DecodeKernel::Simt,
        Ok("sliced") => DecodeKernel::Sliced,
        _ => DecodeKernel::Auto,
    }
}

fn shapes() -> Vec<Shape> {
    let (batches, tokens): (&[usize], &[usize]) = if quick() {
        (&[1], &[1024, 4096])
    } else {
        (&[1, 8, 32], &[1024, 4096, 16384, 32768, 131072])
    };
    let mut all: Vec<(usize, usize, usize)> = batches
        .iter()
        .flat_map(|&b| tokens.iter().map(move |&t| (b, t, HEAD_DIM)))
        .collect();
    if !quick() {
        all.extend(EXTRA_HEAD_DIMS.iter().map(|&d| (8, 32768, d)));
    }
    // `SPARSEKV_BENCH_ONLY=BxT[xD][,...]` (for example 8x16384 or 8x32768x256) keeps those
    // shapes (head_dim 128 unless given), without criterion (for profilers and short runs).
    let only = std::env::var("SPARSEKV_BENCH_ONLY").ok();
    let mut out = Vec::new();
    for (batch, t, head_dim) in all {
        let names = [format!("{batch}x{t}x{head_dim}"), format!("{batch}x{t}")];
        let keep = |o: &str| {
            o.split(',')
                .any(|s| s == names[0] || (head_dim == HEAD_DIM && s == names[1]))
        };
        if only.as_deref().is_some_and(|o| !keep(o)) {
            continue;
        }
        // 32-bit indexing in the kernels: keep every stream array under 2^31 elements;
        // wgpu also refuses buffers of 2 GiB and more.
        let elements = batch * KV_HEADS * t * head_dim;
        let wgpu_limit = cfg!(not(feature = "cuda")) && elements * 2 >= (1usize << 31);
        if elements < (1usize << 31) && !wgpu_limit {
            out.push(Shape {
                batch,
                tokens: t,
                head_dim,
            });
        }
    }
    out
}

fn label(which: Option<usize>) -> String {
    let kind = match which {
        Some(i) => format!("sparse s={}", SPARSITIES[i]),
        None => "dense".into(),
    };
    match bench_kernel() {
        DecodeKernel::Auto => kind,
        kernel => format!("{kind} ({kernel:?})"),
    }
}

fn bench_typed<F: FloatElement>(c: &mut Criterion, client: &ComputeClient<Rt>) {
    let copy_bytes = if quick() { 64 << 20 } else { 1 << 30 };
    let copy = copy_bandwidth(client, copy_bytes);
    let ceiling = read_bandwidth(client, copy_bytes);
    print!(
        "\nCopy ceiling ({}, {} MiB device-to-device, read + written): {:.0} GB/s\n\
         Read-only ceiling (a reduction over {} MiB): {:.0} GB/s\n\n\
         | kernel | B | T | d | dtype | us/call (median) | bytes read | effective GB/s | % of read-only | speedup vs dense |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        backend_name(),
        copy_bytes >> 20,
        copy / 1e9,
        copy_bytes >> 20,
        ceiling / 1e9
    );
    let elem = F::size_bytes();
    for shape in shapes() {
        let dense_bytes = 2 * shape.streams() * shape.tokens * shape.head_dim * elem;
        let sets_count = ROTATION_BYTES.div_ceil(dense_bytes).clamp(1, 16);
        let sets: Vec<CacheSet> = (0..sets_count)
            .map(|i| shape.make_set::<F>(client, 16 * i as u32 + 1))
            .collect();
        let q = random_handle::<F>(client, shape.batch * Q_HEADS * shape.head_dim, 999);
        let out = client.empty(shape.batch * Q_HEADS * shape.head_dim * elem);
        sync(client);
        let kernels = [None, Some(0), Some(1)];
        if shape.batch == 8 && !quick() && std::env::var_os("SPARSEKV_BENCH_ONLY").is_none() {
            let mut group = c.benchmark_group(format!("decode_attention/{}", F::name()));
            group
                .sample_size(10)
                .warm_up_time(Duration::from_millis(500))
                .measurement_time(Duration::from_secs(2));
            for which in kernels {
                let name = label(which).replace(' ', "_");
                let id = format!(
                    "{name}/B{}/T{}/d{}",
                    shape.batch, shape.tokens, shape.head_dim
                );
                group.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        sync(client);
                        let t = Instant::now();
                        for i in 0..iters as usize {
                            shape.run::<F>(client, &sets[i % sets.len()], &q, &out, which);
                        }
                        sync(client);
                        t.elapsed()
                    })
                });
            }
            group.finish();
        }
        let mut dense_time = None;
        for which in kernels {
            let t =
                median_call_times_in_batches(client, calls_per_batch_or(CALLS_PER_BATCH), |i| {
                    shape.run::<F>(client, &sets[i % sets.len()], &q, &out, which)
                })
                .0;
            let dense = *dense_time.get_or_insert(t);
            let bytes = shape.bytes(
                which.map(|i| Sparsity::new(SPARSITIES[i]).expect("valid")),
                elem,
            );
            let bw = bytes as f64 / t.as_secs_f64();
            // Each row as soon as it is measured, so a failure later keeps what was done.
            println!(
                "| {} | {} | {} | {} | {} | {:.1} | {} | {:.0} | {:.0}% | {:.2}x |",
                label(which),
                shape.batch,
                shape.tokens,
                shape.head_dim,
                F::name(),
                t.as_secs_f64() * 1e6,
                bytes,
                bw / 1e9,
                100.0 * bw / ceiling,
                dense.as_secs_f64() / t.as_secs_f64()
            );
        }
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
