//! The window policy's compression of one chunk (64 tokens per sequence) across every layer of
//! a Llama-3-8B-shaped model's sparse caches (32 layers x 8 KV heads, head_dim 128, f16,
//! B = 8, s = 0.7, holding T = 16K tokens), as a decode step pays it: a round of one-token
//! appends to every layer's cache that overflows the windows (prune+compress of the oldest
//! chunk, window compaction, the new row) against the round before it (the new row only).
//! Two kinds of caches in the same run: layer groups (`LayerCaches::sparse`: one launch pair
//! per group of layers) and independent caches (`SparseKvCache::new` per layer: one launch
//! pair per layer). Reported in microseconds and as a fraction of one decode step of the same
//! model (random weights, layer-group caches) measured in the same run, per chunk and
//! amortised over the 64 steps between chunks. `SPARSEKV_BENCH_QUICK=1`: 2 layers, T = 1K.
//! `SPARSEKV_BENCH_LAYERS=n`: n layers.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{
    CHUNK, MODEL_BATCH, ModelBackend, Rt, backend_name, decode_step_times, filled_caches,
    llama3_8b_shape, median_mean, model_layers, quick, sync,
};
use criterion::{Criterion, criterion_group, criterion_main};
use sparsekv::cache::burn::tensor::{Distribution, Tensor};
use sparsekv::cache::{KvCache, KvCacheConfig, LayerCaches, SparseKvCache};
use sparsekv::kernels::cubecl::prelude::*;
use sparsekv::llama::Llama;

const SPARSITY: f64 = 0.7;

/// Median times of an append round that does not compress and of one that does.
struct RoundTimes {
    plain: Duration,
    compressing: Duration,
}

impl RoundTimes {
    /// What the compression adds to the round.
    fn compression(&self) -> Duration {
        self.compressing.saturating_sub(self.plain)
    }
}

/// Fills `layers` caches made by `make` with `tokens` tokens, then `samples` times: appends
/// one token per sequence to every layer until the windows are one token short of full
/// (untimed), times that round (no compression) and the next (it compresses the oldest chunk
/// of every layer), each synchronised on its own.
fn round_times(
    client: &ComputeClient<Rt>,
    layers: usize,
    tokens: usize,
    samples: usize,
    make: impl FnOnce(usize, &KvCacheConfig) -> Vec<SparseKvCache<ModelBackend>>,
) -> RoundTimes {
    let device = Default::default();
    let max_seq = tokens + CHUNK * (samples + 2);
    let mut caches = filled_caches(MODEL_BATCH, layers, tokens, max_seq, SPARSITY, make);
    let shape = [MODEL_BATCH, 8, 1, 128];
    let k = Tensor::<ModelBackend, 4>::random(shape, Distribution::Uniform(-1.0, 1.0), &device);
    let v = Tensor::<ModelBackend, 4>::random(shape, Distribution::Uniform(-1.0, 1.0), &device);
    let mut round = |caches: &mut [SparseKvCache<ModelBackend>]| {
        for cache in caches {
            cache.append(k.clone(), v.clone()).expect("append");
        }
    };
    let timed = |caches: &mut [SparseKvCache<ModelBackend>],
                 round: &mut dyn FnMut(&mut [SparseKvCache<ModelBackend>])| {
        sync(client);
        let t = Instant::now();
        round(caches);
        sync(client);
        t.elapsed()
    };
    let full = caches[0].config().window + CHUNK;
    let (mut plain, mut compressing) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        while caches[0].window_lengths()[0] + 1 < full {
            round(&mut caches);
        }
        plain.push(timed(&mut caches, &mut round));
        let before = caches[0].compressed_lengths()[0];
        compressing.push(timed(&mut caches, &mut round));
        assert_eq!(
            caches[0].compressed_lengths()[0],
            before + CHUNK,
            "the timed round compressed a chunk"
        );
    }
    RoundTimes {
        plain: median_mean(&plain).0,
        compressing: median_mean(&compressing).0,
    }
}

/// Timed by hand, not by criterion's sampler: a compression needs a full window, so every
/// sample costs a chunk of untimed rounds first.
fn compress(_: &mut Criterion) {
    let layers = model_layers();
    let tokens = if quick() { 1024 } else { 16384 };
    let samples = if quick() { 3 } else { 50 };
    let client = Rt::client(&Default::default());
    let device = Default::default();
    let grouped = round_times(&client, layers, tokens, samples, |n, cfg| {
        LayerCaches::<SparseKvCache<ModelBackend>>::sparse(n, cfg, &device)
            .expect("caches")
            .into_layers()
    });
    let alone = round_times(&client, layers, tokens, samples, |n, cfg| {
        (0..n)
            .map(|_| SparseKvCache::<ModelBackend>::new(cfg, &device).expect("cache"))
            .collect()
    });

    for (what, t) in [("layer groups", &grouped), ("independent", &alone)] {
        println!(
            "{what}: append round {:.1} us, round that compresses {:.1} us",
            t.plain.as_secs_f64() * 1e6,
            t.compressing.as_secs_f64() * 1e6
        );
    }

    // One decode step of the same model with layer-group caches, for the fraction.
    let max_seq = tokens + 256;
    let model =
        Llama::<ModelBackend>::random(&llama3_8b_shape(layers, max_seq), &device).expect("model");
    let mut caches = filled_caches(MODEL_BATCH, layers, tokens, max_seq, SPARSITY, |n, cfg| {
        LayerCaches::<SparseKvCache<ModelBackend>>::sparse(n, cfg, &device)
            .expect("caches")
            .into_layers()
    });
    decode_step_times(&model, &mut caches, 4);
    let (step, _) = median_mean(&decode_step_times(&model, &mut caches, 64));
    let row = |what: &str, t: &RoundTimes| {
        let ratio = t.compression().as_secs_f64() / step.as_secs_f64();
        format!(
            "| {what} | {:.1} us | {:.1} us | {:.1} us | {:.2}% | {:.3}% |\n",
            t.plain.as_secs_f64() * 1e6,
            t.compressing.as_secs_f64() * 1e6,
            t.compression().as_secs_f64() * 1e6,
            100.0 * ratio,
            100.0 * ratio / CHUNK as f64,
        )
    };
    println!(
        "\nCompression of one {CHUNK}-token chunk, {layers} layers x 8 KV heads, B = {MODEL_BATCH}, f16, s = {SPARSITY}, T = {tokens}, {} (medians of {samples} rounds)\n\n\
         | caches | append round | round that compresses | compression | fraction of one decode step | amortised over {CHUNK} steps |\n\
         |---|---|---|---|---|---|\n{}{}\
         | decode step (layer groups) | - | - | {:.2} ms | 100% | - |\n",
        backend_name(),
        row("layer groups (`LayerCaches::sparse`)", &grouped),
        row("independent (`SparseKvCache::new` per layer)", &alone),
        step.as_secs_f64() * 1e3
    );
}

criterion_group!(benches, compress);
criterion_main!(benches);
