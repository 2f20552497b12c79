//! Prune+compress of one chunk (64 tokens per sequence) for every layer and KV head of a
//! Llama-3-8B-shaped model (32 layers x 8 KV heads, head_dim 128, f16, B = 8; K and V), as the
//! sparse cache does when its window overflows: the prune+compress kernel, then the copy that
//! compacts the remaining window. Reported in microseconds and as a fraction of one decode
//! step of the same model (random weights, sparse cache at s = 0.7 holding T = 16K tokens),
//! measured in the same run, both per chunk and amortised over the 64 steps between chunks.
//! `SPARSEKV_BENCH_QUICK=1`: 2 layers, T = 1K.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{
    CHUNK, MODEL_BATCH, ModelBackend, Rt, backend_name, decode_step_times, filled_caches,
    llama3_8b_shape, median_call_time, median_mean, model_layers, quick, random_handle, sync,
};
use criterion::{Criterion, criterion_group, criterion_main};
use sparsekv::cache::SparseKvCache;
use sparsekv::format::{HeadDim, Sparsity, keep_count, layout};
use sparsekv::kernels::cubecl::prelude::*;
use sparsekv::kernels::cubecl::server::Handle;
use sparsekv::kernels::{CompressArgs, CompressTarget, CopyRowsArgs, copy_rows, prune_compress};
use sparsekv::llama::Llama;

const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const WINDOW: usize = 32;
const SPARSITY: f64 = 0.7;

/// One layer's buffers: the dense window (K, V) and its compaction target, and the
/// compressed streams (K/V bitmaps and values) with room for `tokens`.
struct LayerBuffers {
    window: [Handle; 2],
    compacted: [Handle; 2],
    bitmaps: [Handle; 2],
    values: [Handle; 2],
}

struct Chunk {
    layers: Vec<LayerBuffers>,
    tokens: usize,
    window_capacity: usize,
}

impl Chunk {
    fn new(client: &ComputeClient<Rt>, layers: usize, tokens: usize) -> Self {
        let hd = HeadDim::new(HEAD_DIM).expect("valid");
        let streams = MODEL_BATCH * KV_HEADS;
        let window_capacity = layout::aligned_capacity(WINDOW + CHUNK);
        let capacity = layout::aligned_capacity(tokens);
        let keep = keep_count(Sparsity::new(SPARSITY).expect("valid"), hd);
        let es = 2;
        let layers = (0..layers)
            .map(|l| {
                let w = |seed| {
                    random_handle::<half::f16>(client, streams * window_capacity * HEAD_DIM, seed)
                };
                let empty = |bytes| client.empty(bytes);
                LayerBuffers {
                    window: [w(4 * l as u32), w(4 * l as u32 + 1)],
                    compacted: [
                        empty(streams * window_capacity * HEAD_DIM * es),
                        empty(streams * window_capacity * HEAD_DIM * es),
                    ],
                    bitmaps: [
                        empty(streams * layout::bitmap_words(capacity, hd) * 4),
                        empty(streams * layout::bitmap_words(capacity, hd) * 4),
                    ],
                    values: [
                        empty(streams * capacity * keep * es),
                        empty(streams * capacity * keep * es),
                    ],
                }
            })
            .collect();
        sync(client);
        Chunk {
            layers,
            tokens,
            window_capacity,
        }
    }

    /// Compresses the oldest `CHUNK` window tokens of every layer, K and V, into the
    /// compressed streams after `tokens - WINDOW - CHUNK` compressed tokens, then compacts
    /// the remaining `WINDOW` rows.
    fn run(&self, client: &ComputeClient<Rt>) {
        let hd = HeadDim::new(HEAD_DIM).expect("valid");
        let sparsity = Sparsity::new(SPARSITY).expect("valid");
        let capacity = layout::aligned_capacity(self.tokens);
        let zeros = vec![0u32; MODEL_BATCH];
        let dst = vec![(self.tokens - WINDOW - CHUNK) as u32; MODEL_BATCH];
        let counts = vec![CHUNK as u32; MODEL_BATCH];
        let from = vec![CHUNK as u32; MODEL_BATCH];
        let rest = vec![WINDOW as u32; MODEL_BATCH];
        for layer in &self.layers {
            // Keys and values in one launch, as the cache does.
            let args = CompressArgs {
                sequences: MODEL_BATCH,
                kv_heads: KV_HEADS,
                head_dim: hd,
                src_stride: self.window_capacity * HEAD_DIM,
                src_start: &zeros,
                dst_start: &dst,
                counts: &counts,
                capacity,
            };
            let targets: Vec<CompressTarget<'_>> = (0..2)
                .map(|kv| CompressTarget {
                    src: &layer.window[kv],
                    bitmap: &layer.bitmaps[kv],
                    values: &layer.values[kv],
                    sparsity,
                })
                .collect();
            prune_compress::<Rt, half::f16>(client, &args, &targets).expect("compress");
            // The K and V windows are compacted in one launch, as the cache does.
            let copy = CopyRowsArgs {
                sequences: MODEL_BATCH,
                kv_heads: KV_HEADS,
                head_dim: HEAD_DIM,
                src_capacity: self.window_capacity,
                dst_capacity: self.window_capacity,
                src_start: &from,
                dst_start: &zeros,
                counts: &rest,
            };
            copy_rows::<Rt, half::f16>(
                client,
                &copy,
                &[
                    (&layer.window[0], &layer.compacted[0]),
                    (&layer.window[1], &layer.compacted[1]),
                ],
            )
            .expect("compact");
        }
    }
}

fn compress(c: &mut Criterion) {
    let layers = model_layers();
    let tokens = if quick() { 1024 } else { 16384 };
    let client = Rt::client(&Default::default());
    let chunk = Chunk::new(&client, layers, tokens);
    let mut group = c.benchmark_group("compress_chunk");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(2));
    group.bench_function(
        format!("{layers}_layers/B{MODEL_BATCH}/chunk{CHUNK}"),
        |b| {
            b.iter_custom(|iters| {
                sync(&client);
                let t = Instant::now();
                for _ in 0..iters {
                    chunk.run(&client);
                }
                sync(&client);
                t.elapsed()
            })
        },
    );
    group.finish();
    let compress_time = median_call_time(&client, |_| chunk.run(&client));
    drop(chunk);

    // One decode step of the same model with a sparse cache, for the fraction.
    let device = Default::default();
    let max_seq = tokens + 256;
    let model =
        Llama::<ModelBackend>::random(&llama3_8b_shape(layers, max_seq), &device).expect("model");
    let mut caches = filled_caches(MODEL_BATCH, layers, tokens, max_seq, SPARSITY, |cfg| {
        SparseKvCache::<ModelBackend>::new(cfg, &device).expect("cache")
    });
    decode_step_times(&model, &mut caches, 4);
    let (step, _) = median_mean(&decode_step_times(&model, &mut caches, 64));
    let ratio = compress_time.as_secs_f64() / step.as_secs_f64();
    println!(
        "\nPrune+compress of one {CHUNK}-token chunk, {layers} layers x {KV_HEADS} KV heads, B = {MODEL_BATCH}, f16, K and V, {}\n\n\
         | work | time (median) | fraction of one decode step | amortised over {CHUNK} steps |\n\
         |---|---|---|---|\n\
         | prune+compress + window compaction | {:.1} us | {:.2}% | {:.3}% |\n\
         | decode step (sparse s = {SPARSITY}, T = {tokens}) | {:.2} ms | 100% | - |\n",
        backend_name(),
        compress_time.as_secs_f64() * 1e6,
        100.0 * ratio,
        100.0 * ratio / CHUNK as f64,
        step.as_secs_f64() * 1e3
    );
}

criterion_group!(benches, compress);
criterion_main!(benches);
