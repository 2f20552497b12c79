//! One end-to-end decode step of a Llama-3-8B-shaped model (random weights, f16; hidden
//! 4096, FFN 14336, 32/8 heads of 128, vocabulary 128256, 32 layers or
//! `SPARSEKV_BENCH_LAYERS`) at B = 8 and T in {4K, 16K} tokens already cached, dense cache vs
//! sparse cache at s = 0.7 (K and V, window 32, chunk 64), in tokens/s.
//!
//! The caches are filled with random keys and values (a prefill of 16K tokens would need
//! dense attention far larger than the step itself). Each step is synchronised. Criterion
//! (`iter_custom`) times the steps; the printed table has the median and the mean over 128
//! consecutive steps (two compressions of a 64-token chunk each for the sparse cache) after
//! 4 warm-up steps. `SPARSEKV_BENCH_QUICK=1`: 2 layers, T = 1K.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{
    MODEL_BATCH, ModelBackend, backend_name, decode_step_times, filled_caches, llama3_8b_shape,
    median_mean, model_layers, quick,
};
use criterion::{Criterion, criterion_group, criterion_main};
use sparsekv::cache::{DenseKvCache, KvCache, SparseKvCache};
use sparsekv::llama::Llama;

const STEPS: usize = 128;
/// Room for warm-up, criterion's steps and the timed steps.
const SLACK: usize = 1024;

fn measure<C: KvCache<ModelBackend>>(
    c: &mut Criterion,
    model: &Llama<ModelBackend>,
    mut caches: Vec<C>,
    max_seq: usize,
    name: &str,
) -> (Duration, Duration) {
    decode_step_times(model, &mut caches, 4);
    let mut group = c.benchmark_group("decode_step");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            if caches[0].lengths()[0] + iters as usize + STEPS > max_seq {
                // Out of room (never at these step times): time nothing rather than
                // overflow the cache.
                return Duration::ZERO;
            }
            decode_step_times(model, &mut caches, iters as usize)
                .into_iter()
                .sum()
        })
    });
    group.finish();
    median_mean(&decode_step_times(model, &mut caches, STEPS))
}

fn decode(c: &mut Criterion) {
    let layers = model_layers();
    let token_counts: &[usize] = if quick() { &[1024] } else { &[4096, 16384] };
    let max_t = token_counts.iter().copied().max().unwrap_or(0);
    let device = Default::default();
    let model = Llama::<ModelBackend>::random(&llama3_8b_shape(layers, max_t + SLACK), &device)
        .expect("model");
    let mut table = format!(
        "\nDecode step, Llama-3-8B shape with {layers} layers, f16, B = {MODEL_BATCH}, {}\n\n\
         | cache | T | step ms (median) | step ms (mean of {STEPS}) | tokens/s (median) | speedup vs dense |\n\
         |---|---|---|---|---|---|\n",
        backend_name()
    );
    for &tokens in token_counts {
        let max_seq = tokens + SLACK;
        let dense = filled_caches(layers, tokens, max_seq, 0.0, |cfg| {
            DenseKvCache::<ModelBackend>::new(cfg, &device).expect("cache")
        });
        let (dense_median, dense_mean) =
            measure(c, &model, dense, max_seq, &format!("dense/T{tokens}"));
        let sparse = filled_caches(layers, tokens, max_seq, 0.7, |cfg| {
            SparseKvCache::<ModelBackend>::new(cfg, &device).expect("cache")
        });
        let (sparse_median, sparse_mean) = measure(
            c,
            &model,
            sparse,
            max_seq,
            &format!("sparse_s0.7/T{tokens}"),
        );
        for (name, median, mean) in [
            ("dense", dense_median, dense_mean),
            ("sparse s=0.7", sparse_median, sparse_mean),
        ] {
            table.push_str(&format!(
                "| {name} | {tokens} | {:.2} | {:.2} | {:.0} | {:.2}x |\n",
                median.as_secs_f64() * 1e3,
                mean.as_secs_f64() * 1e3,
                MODEL_BATCH as f64 / median.as_secs_f64(),
                dense_median.as_secs_f64() / median.as_secs_f64()
            ));
        }
        eprintln!("done T={tokens}");
    }
    println!("{table}");
}

criterion_group!(benches, decode);
criterion_main!(benches);
