//! One end-to-end decode step of a Llama-3-8B-shaped model (random weights, f16; hidden
//! 4096, FFN 14336, 32/8 heads of 128, vocabulary 128256, 32 layers or
//! `SPARSEKV_BENCH_LAYERS`) at B = 8 with T in {4K, 16K, 32K} tokens already cached and at
//! B = 1, T = 4K, dense cache vs sparse cache at s = 0.7 (K and V, window 32, chunk 64), in
//! tokens/s, with the floor each row has at the read-only bandwidth measured in the same run
//! (weights plus the cache's bytes). scripts/decode_baseline.py is the PyTorch peer.
//!
//! The caches are filled with random keys and values (a prefill of 16K tokens would need
//! dense attention far larger than the step itself). Each step is synchronised. Criterion
//! (`iter_custom`) times the steps; the printed table has the median and the mean over 128
//! consecutive steps (two compressions of a 64-token chunk each for the sparse cache) after
//! 4 warm-up steps. `SPARSEKV_BENCH_QUICK=1`: 2 layers, B = 2, T = 1K;
//! `SPARSEKV_BENCH_ONLY=8x16384,1x4096`: only those `BxT` shapes.
//!
//! `SPARSEKV_BENCH_PROFILE=sparse` (or `dense`) runs four steps through that cache only,
//! untimed, for a profiler (see `profile_steps`).
//!
//! `SPARSEKV_BENCH_PREFILL=1x32768` (any `BxT` list) replaces the decode rows by prefill rows:
//! one exact prefill of `T` tokens per sequence into sparse caches at s = 0.7 (bare backend),
//! timed after a warm-up prefill of the same shape (kernels compile at their first launch), with
//! the device memory CubeCL holds afterwards (its pools keep their pages, so that is the peak;
//! the pools are cleaned up once the model is loaded) beside the weights and the final cache.
//! `scripts/decode_baseline.py --prefill` is the peer. Each prefill row is followed by the
//! same prefill into dense caches (what compression costs is the difference) and by one
//! layer's prompt attention alone (`SparseKvBackend::prompt_attention`, the mean of 5 calls,
//! and its rate in causal TFLOP/s), whose peer is the script's SDPA row.
//!
//! `SPARSEKV_BENCH_STREAM=8x131072` (any `BxT` list) replaces all rows by the long-context
//! showcase: first a dense cache for `T + 64` tokens per sequence is asked for (on an H200 and
//! smaller it does not fit beside the weights: the row shows the typed capacity error, nothing
//! allocated), then sparse caches at s = 0.7 with the streaming prefill policy
//! (`SPARSEKV_BENCH_STREAM_CHUNK` prompt tokens per chunk, 4096 by default) take a prompt of
//! `T` tokens per sequence, after a warm-up prefill of two chunks, and decode 4 + 64 steps; the
//! row has the prefill time, the decode step's median and tokens/s, and CubeCL's reserved
//! memory after each phase (its pools keep their pages: that is the peak so far).
//!
//! `SPARSEKV_BENCH_MATMUL=32768` (a token count) replaces all rows by a sweep of cubek's matmul
//! strategies over the prefill's projection shapes (`[T, k] x [n, k]^T`, f16, the weights
//! transposed as the model reads them), in TFLOP/s; `scripts/decode_baseline.py --prefill`
//! times cuBLAS at the same shapes.
//!
//! Every row runs on both Burn backend types, one after the other in the same process: the
//! bare `CubeBackend` and Burn's fused backend (`burn::backend::Cuda<f16>` / `Wgpu<f16>` as
//! Burn's default features make them). `SPARSEKV_BENCH_BACKENDS=bare` or `=fused`: only one.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{
    CHUNK, FusedModelBackend, ModelBackend, Rt, backend_name, decode_step_host_times,
    decode_step_times, filled_caches, llama3_8b_shape, mean_call_time, median_mean, model_layers,
    quick, read_bandwidth, sync,
};
use criterion::{Criterion, criterion_group, criterion_main};
use sparsekv::cache::burn::tensor::{Distribution, Tensor};
use sparsekv::cache::{
    DenseKvCache, KvCache, KvCacheConfig, LayerCaches, PrefillPolicy, SparseKvBackend,
    SparseKvCache,
};
use sparsekv::format::{HeadDim, PromptShape, ValueType};
use sparsekv::kernels::cubecl::prelude::Runtime;
use sparsekv::llama::Llama;

const STEPS: usize = 128;
/// Room for warm-up, criterion's steps and the timed steps.
const SLACK: usize = 1024;

fn measure<B: SparseKvBackend, C: KvCache<B>>(
    c: &mut Criterion,
    model: &Llama<B>,
    mut caches: Vec<C>,
    max_seq: usize,
    name: &str,
) -> (Duration, Duration, Duration) {
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
    let times = decode_step_host_times(model, &mut caches, STEPS);
    let (total, host): (Vec<Duration>, Vec<Duration>) = times.into_iter().unzip();
    let (median, mean) = median_mean(&total);
    (median, mean, median_mean(&host).0)
}

/// Bytes of every weight a decode step reads: the fused projections, the norms and the head.
fn weight_bytes(c: &sparsekv::llama::LlamaConfig) -> usize {
    let hd = c.dim / c.n_heads;
    let (q, kv) = (c.n_heads * hd, c.n_kv_heads * hd);
    let layer = (q + 2 * kv) * c.dim + c.dim * q + 3 * c.hidden_dim * c.dim + 2 * c.dim;
    2 * (c.n_layers * layer + c.vocab_size * c.dim + c.dim)
}

/// What every row of the table shares.
struct Setup {
    layers: usize,
    shapes: Vec<(usize, usize)>,
    ceiling: f64,
    weights: usize,
}

fn decode(c: &mut Criterion) {
    let layers = model_layers();
    if let Some(tokens) = std::env::var("SPARSEKV_BENCH_MATMUL")
        .ok()
        .and_then(|t| t.parse().ok())
    {
        matmul_sweep(tokens);
        return;
    }
    if let Ok(list) = std::env::var("SPARSEKV_BENCH_PREFILL") {
        prefill(&parse_shapes(&list), layers);
        return;
    }
    if let Ok(list) = std::env::var("SPARSEKV_BENCH_STREAM") {
        stream_showcase(&parse_shapes(&list), layers);
        return;
    }
    // (B, T): the shapes; quick runs one small one.
    let only = std::env::var("SPARSEKV_BENCH_ONLY")
        .ok()
        .map(|v| parse_shapes(&v));
    let shapes = match only {
        Some(list) => list,
        None if quick() => vec![(2, 1024)],
        None => vec![(8, 4096), (8, 16384), (8, 32768), (1, 4096)],
    };
    let client = Rt::client(&Default::default());
    let ceiling = read_bandwidth(&client, if quick() { 64 << 20 } else { 1 << 30 });
    let max_t = shapes.iter().map(|s| s.1).max().unwrap_or(0);
    let weights = weight_bytes(&llama3_8b_shape(layers, max_t + SLACK));
    let setup = Setup {
        layers,
        shapes,
        ceiling,
        weights,
    };
    let mut table = format!(
        "\nDecode step, Llama-3-8B shape with {layers} layers, f16, {}; read-only ceiling {:.0} GB/s, \
         weights {:.2} GB\n\n\
         | backend | cache | B | T | step ms (median) | step ms (mean of {STEPS}) | host ms to issue (median) | tokens/s (median) | speedup vs dense | GB read | floor ms at read-only | of floor |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        backend_name(),
        ceiling / 1e9,
        weights as f64 / 1e9
    );
    let backends = std::env::var("SPARSEKV_BENCH_BACKENDS").unwrap_or_else(|_| "bare,fused".into());
    for backend in backends.split(',') {
        match backend {
            "bare" => rows::<ModelBackend>(c, "bare", &setup, &mut table),
            "fused" => rows::<FusedModelBackend>(c, "fused", &setup, &mut table),
            other => panic!("SPARSEKV_BENCH_BACKENDS: unknown backend {other:?} (bare, fused)"),
        }
    }
    println!("{table}");
}

/// `BxT` shapes of a comma-separated list.
fn parse_shapes(list: &str) -> Vec<(usize, usize)> {
    list.split(',')
        .filter_map(|s| s.split_once('x'))
        .filter_map(|(b, t)| Some((b.parse().ok()?, t.parse().ok()?)))
        .collect()
}

/// The prefill rows (module docs): exact prefill into sparse caches, time and peak memory.
fn prefill(shapes: &[(usize, usize)], layers: usize) {
    let device = Default::default();
    let client = Rt::client(&device);
    let max_t = shapes.iter().map(|s| s.1).max().unwrap_or(0);
    let config = llama3_8b_shape(layers, max_t);
    let model = Llama::<ModelBackend>::random(&config, &device).expect("model");
    // Give back the pool pages the random initialisation left empty, so that the peak below
    // is the model's and the prefill's (on the H100 CubeCL still held 20 GB for 16 GB of
    // weights after this: BENCHMARKS.md).
    sync(&client);
    client.memory_cleanup();
    let embedding = config.vocab_size * config.dim * 2;
    let weights = (weight_bytes(&config) + embedding) as f64;
    let reserved = || {
        sync(&client);
        client.memory_usage().map_or(0, |u| u.bytes_reserved) as f64
    };
    let gb = |bytes: f64| bytes / 1e9;
    println!(
        "\nExact prefill, Llama-3-8B shape with {layers} layers, f16, {}, bare backend, sparse caches \
         s = 0.7; weights {:.2} GB (embedding included); device memory CubeCL holds with the model \
         loaded: {:.2} GB ({:.2} GB of it in use by live buffers)\n\n\
         | B | T | prefill s | prompt tokens/s | peak GB (CubeCL's pools after) | weights + final cache GB | bar: weights + cache + 4 GB |\n\
         |---|---|---|---|---|---|---|",
        backend_name(),
        gb(weights),
        gb(reserved()),
        gb(client.memory_usage().map_or(0, |u| u.bytes_in_use) as f64)
    );
    for &(batch, tokens) in shapes {
        let prompts = bench_prompts(batch, tokens, config.vocab_size);
        let prompts: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let kv = KvCacheConfig::new(batch, config.n_kv_heads, config.head_dim(), tokens)
            .with_sparsity(0.7, 0.7)
            .with_chunk(CHUNK)
            .with_value_type(ValueType::F16);
        let run = || {
            let mut caches =
                LayerCaches::<SparseKvCache<ModelBackend>>::sparse(layers, &kv, &device)
                    .expect("caches");
            sync(&client);
            let t = Instant::now();
            let logits = model
                .prefill_batch(&prompts, caches.layers_mut())
                .expect("prefill");
            sync(&client);
            let time = t.elapsed();
            assert_eq!(logits.dims(), [batch, config.vocab_size]);
            let cache: usize = caches.layers().iter().map(|c| c.allocated_bytes()).sum();
            (time, cache as f64)
        };
        run();
        let (time, cache) = run();
        let peak = reserved();
        println!(
            "| {batch} | {tokens} | {:.3} | {:.0} | {:.2} | {:.2} | {:.2} ({}) |",
            time.as_secs_f64(),
            (batch * tokens) as f64 / time.as_secs_f64(),
            gb(peak),
            gb(weights + cache),
            gb(weights + cache + 4e9),
            if peak <= weights + cache + 4e9 {
                "met"
            } else {
                "missed"
            }
        );
        // The same prefill into dense caches (nothing compressed): the difference is what
        // pruning and compressing the prompt costs.
        let dense = KvCacheConfig::new(batch, config.n_kv_heads, config.head_dim(), tokens)
            .with_value_type(ValueType::F16);
        let mut caches = LayerCaches::<DenseKvCache<ModelBackend>>::dense(layers, &dense, &device)
            .expect("caches");
        sync(&client);
        let t = Instant::now();
        model
            .prefill_batch(&prompts, caches.layers_mut())
            .expect("prefill");
        sync(&client);
        println!(
            "| the same into dense caches (no compression) | {batch} | {tokens} | {:.3} s | - | - | - |",
            t.elapsed().as_secs_f64()
        );
        drop(caches);
        prompt_attention_row(&config, batch, tokens);
    }
}

/// `batch` prompts of `tokens` token ids spread over the vocabulary, different per sequence.
fn bench_prompts(batch: usize, tokens: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|s| {
            (0..tokens)
                .map(|i| ((i * 7919 + s * 104_729) % (vocab - 1) + 1) as u32)
                .collect()
        })
        .collect()
}

/// Decode steps after the showcase's prefill (timed), after [`SHOWCASE_WARM_UP`] more (the
/// decode kernels compile at their first launch).
const SHOWCASE_STEPS: usize = 64;
const SHOWCASE_WARM_UP: usize = 4;

/// The long-context showcase (module docs).
fn stream_showcase(shapes: &[(usize, usize)], layers: usize) {
    let device = Default::default();
    let client = Rt::client(&device);
    let chunk: usize = std::env::var("SPARSEKV_BENCH_STREAM_CHUNK")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(4096);
    let max_t = shapes.iter().map(|s| s.1).max().unwrap_or(0) + SHOWCASE_STEPS + SHOWCASE_WARM_UP;
    let config = llama3_8b_shape(layers, max_t);
    let model = Llama::<ModelBackend>::random(&config, &device).expect("model");
    sync(&client);
    client.memory_cleanup();
    let gb = |bytes: f64| bytes / 1e9;
    let reserved = || {
        sync(&client);
        gb(client.memory_usage().map_or(0, |u| u.bytes_reserved) as f64)
    };
    println!(
        "\nLong-context showcase, Llama-3-8B shape with {layers} layers, f16, {}, bare backend; \
         streaming prefill in chunks of {chunk} tokens into sparse caches s = 0.7 (window 32), \
         then {SHOWCASE_STEPS} decode steps; CubeCL holds {:.2} GB with the model loaded\n",
        backend_name(),
        reserved()
    );
    for &(batch, tokens) in shapes {
        let seq = tokens + SHOWCASE_STEPS + SHOWCASE_WARM_UP;
        let dense = KvCacheConfig::new(batch, config.n_kv_heads, config.head_dim(), seq)
            .with_value_type(ValueType::F16);
        match LayerCaches::<DenseKvCache<ModelBackend>>::dense(layers, &dense, &device) {
            Err(e) => println!(
                "- dense caches for B = {batch}, {seq} tokens: refused before any allocation: {e} \
                 (CubeCL still holds {:.2} GB)",
                reserved()
            ),
            Ok(caches) => {
                let bytes: usize = caches.layers().iter().map(|c| c.allocated_bytes()).sum();
                println!(
                    "- dense caches for B = {batch}, {seq} tokens fit on this device ({:.2} GB)",
                    gb(bytes as f64)
                );
            }
        }
        let sparse = KvCacheConfig::new(batch, config.n_kv_heads, config.head_dim(), seq)
            .with_sparsity(0.7, 0.7)
            .with_chunk(CHUNK)
            .with_value_type(ValueType::F16)
            .with_prefill(PrefillPolicy::Streaming { chunk });
        let prompts = bench_prompts(batch, tokens, config.vocab_size);
        // Warm-up: two chunks into small caches compile every kernel of the prefill.
        {
            let warm = KvCacheConfig {
                max_seq: 2 * chunk.min(tokens),
                ..sparse.clone()
            };
            let mut caches =
                LayerCaches::<SparseKvCache<ModelBackend>>::sparse(layers, &warm, &device)
                    .expect("warm-up caches");
            let short: Vec<&[u32]> = prompts.iter().map(|p| &p[..warm.max_seq]).collect();
            model
                .prefill_batch(&short, caches.layers_mut())
                .expect("warm-up prefill");
            sync(&client);
        }
        client.memory_cleanup();
        let mut caches =
            LayerCaches::<SparseKvCache<ModelBackend>>::sparse(layers, &sparse, &device)
                .expect("sparse caches");
        let cache_gb = gb(caches
            .layers()
            .iter()
            .map(|c| c.allocated_bytes())
            .sum::<usize>() as f64);
        let prompts: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        sync(&client);
        let t = Instant::now();
        let logits = model
            .prefill_batch(&prompts, caches.layers_mut())
            .expect("streaming prefill");
        sync(&client);
        let prefill = t.elapsed().as_secs_f64();
        assert_eq!(logits.dims(), [batch, config.vocab_size]);
        drop(logits);
        let after_prefill = reserved();
        decode_step_times(&model, caches.layers_mut(), SHOWCASE_WARM_UP);
        let steps = decode_step_times(&model, caches.layers_mut(), SHOWCASE_STEPS);
        let (median, mean) = median_mean(&steps);
        let after_decode = reserved();
        println!(
            "\n| B | T | chunk | prefill s | prompt tokens/s | decode step ms (median / mean of {SHOWCASE_STEPS}) | decode tokens/s | sparse caches GB | CubeCL GB after prefill | after decode |\n\
             |---|---|---|---|---|---|---|---|---|---|\n\
             | {batch} | {tokens} | {chunk} | {prefill:.1} | {:.0} | {:.1} / {:.1} | {:.0} | {cache_gb:.2} | {after_prefill:.2} | {after_decode:.2} |",
            (batch * tokens) as f64 / prefill,
            median.as_secs_f64() * 1e3,
            mean.as_secs_f64() * 1e3,
            batch as f64 / median.as_secs_f64(),
        );
    }
}

/// The matmul sweep (module docs): each projection shape of a prefill of `tokens` tokens
/// through each of cubek's strategies (Burn's default without its autotune feature is
/// `Auto`), 1 warm-up and 3 timed calls each; a strategy that cannot launch (or panics) is
/// reported as such.
fn matmul_sweep(tokens: usize) {
    use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems};
    use cubek::matmul::launch::{Strategy, launch_ref};
    use cubek::std::InputBinding;
    use sparsekv::kernels::cubecl::prelude::CubePrimitive;
    use std::panic::{AssertUnwindSafe, catch_unwind};
    let device = Default::default();
    let client = Rt::client(&device);
    let f16 = half::f16::as_type_native_unchecked().storage_type();
    let strategies: Vec<(&str, Strategy)> = vec![
        ("Auto", Strategy::Auto),
        (
            "SimpleCyclicMma",
            Strategy::SimpleCyclicMma(Default::default()),
        ),
        (
            "DoubleCyclicCmma",
            Strategy::DoubleCyclicCmma(Default::default()),
        ),
        (
            "DoubleCyclicMma",
            Strategy::DoubleCyclicMma(Default::default()),
        ),
        (
            "DoubleTilewiseMma",
            Strategy::DoubleTilewiseMma(Default::default()),
        ),
        (
            "OrderedDoubleCmma",
            Strategy::OrderedDoubleCmma(Default::default()),
        ),
        (
            "OrderedDoubleMma",
            Strategy::OrderedDoubleMma(Default::default()),
        ),
        ("SimpleTmaMma", Strategy::SimpleTmaMma(Default::default())),
        ("DoubleTmaMma", Strategy::DoubleTmaMma(Default::default())),
        (
            "SpecializedTmaMma",
            Strategy::SpecializedTmaMma(Default::default()),
        ),
        (
            "SpecializedCyclicMma",
            Strategy::SpecializedCyclicMma(Default::default()),
        ),
    ];
    println!(
        "\nPrefill projections through cubek's matmul strategies, T = {tokens}, f16, {}\n\n\
         | projection | n x k | strategy | ms | TFLOP/s |\n|---|---|---|---|---|",
        backend_name()
    );
    let random = |dims: [usize; 2]| {
        Tensor::<ModelBackend, 2>::random(dims, Distribution::Normal(0.0, 0.02), &device)
    };
    for (name, n, k) in [
        ("QKV", 6144, 4096),
        ("output", 4096, 4096),
        ("gate+up", 28672, 4096),
        ("down", 4096, 14336),
    ] {
        let x = random([tokens, k]).into_primitive().tensor();
        let wt = random([n, k]).transpose().into_primitive().tensor();
        for (label, strategy) in &strategies {
            let launch = || {
                let out = Tensor::<ModelBackend, 2>::empty([tokens, n], &device)
                    .into_primitive()
                    .tensor();
                let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems {
                    lhs: f16,
                    rhs: f16,
                    out: f16,
                });
                catch_unwind(AssertUnwindSafe(|| {
                    launch_ref(
                        strategy,
                        &client,
                        InputBinding::new(x.clone().binding(), f16),
                        InputBinding::new(wt.clone().binding(), f16),
                        out.binding(),
                        &mut dtypes,
                    )
                    .map_err(|e| format!("{e:?}"))
                }))
                .unwrap_or_else(|_| Err("panicked".to_string()))
            };
            if let Err(e) = launch() {
                let e: String = e.chars().take(80).collect();
                println!("| {name} | {n} x {k} | {label} | unavailable: {e} | - |");
                continue;
            }
            let ms = mean_call_time(&client, 3, || {
                let _ = launch();
            })
            .as_secs_f64()
                * 1e3;
            let flops = 2.0 * (tokens * n * k) as f64;
            println!(
                "| {name} | {n} x {k} | {label} | {ms:.2} | {:.0} |",
                flops / ms / 1e9
            );
        }
    }
}

/// One layer's prompt attention alone at `batch` x `tokens` (module docs), where the bare
/// backend has the kernel.
fn prompt_attention_row(config: &sparsekv::llama::LlamaConfig, batch: usize, tokens: usize) {
    let device = Default::default();
    let client = Rt::client(&device);
    let (h, kvh, hd) = (config.n_heads, config.n_kv_heads, config.head_dim());
    let shape = PromptShape::new(batch, tokens, h, kvh, HeadDim::new(hd).expect("head_dim"))
        .expect("shape");
    if let Some(why) = ModelBackend::prompt_attention_unsupported(&device, ValueType::F16, shape) {
        println!("| prompt attention alone: no kernel here ({why}) |");
        return;
    }
    let random = |dims: [usize; 4]| {
        Tensor::<ModelBackend, 4>::random(dims, Distribution::Normal(0.0, 1.0), &device)
            .into_primitive()
            .tensor()
    };
    let (q, k, v) = (
        random([batch, tokens, h, hd]),
        random([batch, kvh, tokens, hd]),
        random([batch, kvh, tokens, hd]),
    );
    let attend = || {
        ModelBackend::prompt_attention(q.clone(), k.clone(), v.clone()).expect("prompt attention")
    };
    attend();
    let ms = mean_call_time(&client, 5, || {
        attend();
    })
    .as_secs_f64()
        * 1e3;
    let flops = 4.0 * (batch * h * hd) as f64 * (tokens * (tokens + 1) / 2) as f64;
    println!(
        "| prompt attention kernel, one layer's attention | {batch} | {tokens} | {ms:.2} ms | {:.0} TFLOP/s | - | - |",
        flops / ms / 1e9
    );
}

/// The table's rows of one backend type (its model is dropped before the next one's).
fn rows<B: SparseKvBackend>(c: &mut Criterion, label: &str, setup: &Setup, table: &mut String) {
    let Setup {
        layers,
        ref shapes,
        ceiling,
        weights,
    } = *setup;
    let max_t = shapes.iter().map(|s| s.1).max().unwrap_or(0);
    let device = Default::default();
    let config = llama3_8b_shape(layers, max_t + SLACK);
    let model = Llama::<B>::random(&config, &device).expect("model");
    if let Ok(kind) = std::env::var("SPARSEKV_BENCH_PROFILE") {
        profile_steps(&model, layers, shapes, &kind);
        return;
    }
    for &(batch, tokens) in shapes {
        let max_seq = tokens + SLACK;
        let dense = filled_caches(batch, layers, tokens, max_seq, 0.0, |n, cfg| {
            LayerCaches::<DenseKvCache<B>>::dense(n, cfg, &device)
                .expect("caches")
                .into_layers()
        });
        let dense_kv: u64 = dense.iter().map(|c| c.memory().total()).sum();
        let (dense_median, dense_mean, dense_host) = measure(
            c,
            &model,
            dense,
            max_seq,
            &format!("{label}/dense/B{batch}/T{tokens}"),
        );
        let sparse = filled_caches(batch, layers, tokens, max_seq, 0.7, |n, cfg| {
            LayerCaches::<SparseKvCache<B>>::sparse(n, cfg, &device)
                .expect("caches")
                .into_layers()
        });
        let sparse_kv: u64 = sparse.iter().map(|c| c.memory().total()).sum();
        let (sparse_median, sparse_mean, sparse_host) = measure(
            c,
            &model,
            sparse,
            max_seq,
            &format!("{label}/sparse_s0.7/B{batch}/T{tokens}"),
        );
        for (name, median, mean, host, kv) in [
            ("dense", dense_median, dense_mean, dense_host, dense_kv),
            (
                "sparse s=0.7",
                sparse_median,
                sparse_mean,
                sparse_host,
                sparse_kv,
            ),
        ] {
            let bytes = weights as f64 + kv as f64;
            let floor = bytes / ceiling;
            table.push_str(&format!(
                "| {label} | {name} | {batch} | {tokens} | {:.2} | {:.2} | {:.2} | {:.0} | {:.2}x | {:.2} | {:.2} | {:.0}% |\n",
                median.as_secs_f64() * 1e3,
                mean.as_secs_f64() * 1e3,
                host.as_secs_f64() * 1e3,
                batch as f64 / median.as_secs_f64(),
                dense_median.as_secs_f64() / median.as_secs_f64(),
                bytes / 1e9,
                floor * 1e3,
                100.0 * floor / median.as_secs_f64()
            ));
        }
        eprintln!("done {label} B={batch} T={tokens}");
        println!("{}", table.lines().last().unwrap_or_default());
    }
}

/// `SPARSEKV_BENCH_PROFILE=dense` or `=sparse`: three decode steps through caches of that kind
/// at each shape (after one step in which the kernels compile), no timing, nothing else: for
/// a profiler that lists each launch (`ncu --metrics gpu__time_duration.sum`), to see where a
/// step's time goes kernel by kernel.
fn profile_steps<B: SparseKvBackend>(
    model: &Llama<B>,
    layers: usize,
    shapes: &[(usize, usize)],
    kind: &str,
) {
    let device = Default::default();
    for &(batch, tokens) in shapes {
        let max_seq = tokens + SLACK;
        match kind {
            "dense" => {
                let mut caches = filled_caches(batch, layers, tokens, max_seq, 0.0, |n, cfg| {
                    LayerCaches::<DenseKvCache<B>>::dense(n, cfg, &device)
                        .expect("caches")
                        .into_layers()
                });
                decode_step_times(model, &mut caches, 4);
            }
            "sparse" => {
                let mut caches = filled_caches(batch, layers, tokens, max_seq, 0.7, |n, cfg| {
                    LayerCaches::<SparseKvCache<B>>::sparse(n, cfg, &device)
                        .expect("caches")
                        .into_layers()
                });
                decode_step_times(model, &mut caches, 4);
            }
            other => panic!("SPARSEKV_BENCH_PROFILE: unknown cache {other:?} (dense, sparse)"),
        }
    }
}

criterion_group!(benches, decode);
criterion_main!(benches);
