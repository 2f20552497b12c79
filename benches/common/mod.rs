//! Shared by the benches: the runtime the features select, device-side random data, device
//! synchronisation, the copy-bandwidth ceiling and a median timer.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use sparsekv::cache::SparseKvBackend;
use sparsekv::kernels::FloatElement;
use sparsekv::kernels::cubecl;
use sparsekv::kernels::cubecl::prelude::*;
use sparsekv::kernels::cubecl::server::Handle;

#[cfg(feature = "cuda")]
pub type Rt = sparsekv::kernels::cubecl::cuda::CudaRuntime;
#[cfg(not(feature = "cuda"))]
pub type Rt = sparsekv::kernels::cubecl::wgpu::WgpuRuntime;

/// The backend's name, for the tables.
pub fn backend_name() -> &'static str {
    if cfg!(feature = "cuda") {
        "CUDA"
    } else if cfg!(feature = "vulkan") {
        "wgpu (SPIR-V on Vulkan)"
    } else {
        "wgpu"
    }
}

/// Whether `SPARSEKV_BENCH_QUICK` asks for the small shapes only (a software adapter).
pub fn quick() -> bool {
    std::env::var_os("SPARSEKV_BENCH_QUICK").is_some()
}

/// Cubes of the grid-stride kernels: enough to fill any GPU, within every API's limits.
const GRID: u32 = 4096;
const UNITS: u32 = 256;

/// Uniform values in [-1, 1) from a hash of the index and the seed.
#[cube(launch)]
fn fill_uniform_kernel<F: Float>(out: &mut Array<F>, seed: u32) {
    let n = out.len();
    let stride = CUBE_COUNT * CUBE_DIM as usize;
    let mut i = ABSOLUTE_POS;
    while i < n {
        let mut x = u32::cast_from(i) ^ seed;
        x ^= x >> 16;
        x *= 0x7feb_352du32;
        x ^= x >> 15;
        x *= 0x846c_a68bu32;
        x ^= x >> 16;
        out[i] = F::cast_from(x >> 8) * F::new(1.0 / 8_388_608.0) - F::new(1.0);
        i += stride;
    }
}

/// Copies the first `vectors` vectors of `N` from `src` to `dst`.
#[cube(launch)]
fn copy_kernel<N: Size>(
    src: &Array<Vector<f32, N>>,
    dst: &mut Array<Vector<f32, N>>,
    vectors: u32,
) {
    let n = vectors as usize;
    let stride = CUBE_COUNT * CUBE_DIM as usize;
    let mut i = ABSOLUTE_POS;
    while i < n {
        dst[i] = src[i];
        i += stride;
    }
}

/// Sums the first `vectors` vectors of `N` (grid-stride, 16-byte loads) and writes one
/// partial sum per unit, so the loads cannot be optimised away: a kernel that only reads.
#[cube(launch)]
fn read_sum_kernel<N: Size>(src: &Array<Vector<f32, N>>, sums: &mut Array<f32>, vectors: u32) {
    let n = vectors as usize;
    let stride = CUBE_COUNT * CUBE_DIM as usize;
    let mut i = ABSOLUTE_POS;
    let mut acc = Vector::<f32, N>::empty().fill(0.0);
    while i < n {
        acc += src[i];
        i += stride;
    }
    let mut total = 0.0f32;
    #[unroll]
    for e in 0..acc.size() {
        total += acc[e];
    }
    sums[ABSOLUTE_POS] = total;
}

/// [`read_sum_kernel`] with each unit's next `batch` loads issued before any is added (the
/// last ones clamped to the buffer and not counted): more bytes in flight per unit, for
/// buffers that a grid covers in one or two passes.
#[cube(launch)]
fn read_sum_batched_kernel<N: Size>(
    src: &Array<Vector<f32, N>>,
    sums: &mut Array<f32>,
    vectors: u32,
    #[comptime] batch: usize,
) {
    let n = vectors as usize;
    let stride = CUBE_COUNT * CUBE_DIM as usize;
    let mut acc = Vector::<f32, N>::empty().fill(0.0);
    let zero = Vector::<f32, N>::empty().fill(0.0);
    let mut base = ABSOLUTE_POS;
    while base < n {
        let mut staged = Array::<Vector<f32, N>>::new(batch);
        #[unroll]
        for u in 0..batch {
            staged[u] = src[min(base + u * stride, n - 1)];
        }
        #[unroll]
        for u in 0..batch {
            acc += select(base + u * stride < n, staged[u], zero);
        }
        base += batch * stride;
    }
    let mut total = 0.0f32;
    #[unroll]
    for e in 0..acc.size() {
        total += acc[e];
    }
    sums[ABSOLUTE_POS] = total;
}

/// A device buffer of `n` random `F` in [-1, 1), filled on the device.
pub fn random_handle<F: FloatElement>(client: &ComputeClient<Rt>, n: usize, seed: u32) -> Handle {
    let handle = client.empty(n * F::size_bytes());
    unsafe {
        fill_uniform_kernel::launch::<F, Rt>(
            client,
            CubeCount::Static(GRID, 1, 1),
            CubeDim::new_1d(UNITS),
            ArrayArg::from_raw_parts(handle.clone(), n),
            seed.wrapping_mul(0x9e37_79b9) ^ 0x5bd1_e995,
        );
    }
    handle
}

/// Waits for the device to finish everything queued.
pub fn sync(client: &ComputeClient<Rt>) {
    cubecl::future::block_on(client.sync()).expect("device sync");
}

/// Mean time per call of `reps` back-to-back calls of `call`, the device synchronised before
/// and after (for calls of tens of milliseconds, already warmed up by the caller).
pub fn mean_call_time(client: &ComputeClient<Rt>, reps: u32, mut call: impl FnMut()) -> Duration {
    sync(client);
    let t = Instant::now();
    for _ in 0..reps {
        call();
    }
    sync(client);
    t.elapsed() / reps
}

/// Median per-call time of `call(i)` over 15 batches of [`calls_per_batch`] calls (call `i` of
/// a batch gets `i`), after 10 warm-up calls, with the device synchronised around each batch
/// (quick runs: 3 batches after 1).
pub fn median_call_time(client: &ComputeClient<Rt>, call: impl FnMut(usize)) -> Duration {
    median_call_times(client, call).0
}

/// [`median_call_time`] and the median host time per call of the same batches: the time until
/// the last call of a batch returns, before the device is synchronised. When the two are
/// close, the calls are bound by the host's launch work, not by the device.
pub fn median_call_times(
    client: &ComputeClient<Rt>,
    call: impl FnMut(usize),
) -> (Duration, Duration) {
    median_call_times_in_batches(client, calls_per_batch(), call)
}

/// Calls per timed batch: `SPARSEKV_BENCH_CALLS`, else 20 (2 in quick runs). CubeCL 0.10 hands
/// launches to its device thread in groups of 32 (or when something synchronises), so a batch
/// of fewer launches than that is issued by the caller before the device starts any of it:
/// larger batches measure the steady state where issuing and running overlap.
pub fn calls_per_batch() -> usize {
    calls_per_batch_or(20)
}

/// [`calls_per_batch`] with another default than 20 for a bench whose calls are short.
pub fn calls_per_batch_or(default: usize) -> usize {
    std::env::var("SPARSEKV_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or(if quick() { 2 } else { default })
}

/// [`median_call_times`] with `calls` calls per batch.
pub fn median_call_times_in_batches(
    client: &ComputeClient<Rt>,
    calls: usize,
    mut call: impl FnMut(usize),
) -> (Duration, Duration) {
    let (warm, batches) = if quick() { (1, 3) } else { (10, 15) };
    for i in 0..warm {
        call(i);
    }
    sync(client);
    let (mut per_call, mut host): (Vec<Duration>, Vec<Duration>) = (0..batches)
        .map(|_| {
            let t = Instant::now();
            for i in 0..calls {
                call(i);
            }
            let enqueued = t.elapsed();
            sync(client);
            (t.elapsed() / calls as u32, enqueued / calls as u32)
        })
        .unzip();
    per_call.sort();
    host.sort();
    (per_call[per_call.len() / 2], host[host.len() / 2])
}

/// Device-to-device copy bandwidth in bytes per second (read + written), copying `bytes`
/// bytes with 16-byte loads and stores: the ceiling the attention kernels are held to.
pub fn copy_bandwidth(client: &ComputeClient<Rt>, bytes: usize) -> f64 {
    let n = bytes / 4;
    let src = random_handle::<f32>(client, n, 7);
    let dst = client.empty(n * 4);
    let t = median_call_time(client, |_| unsafe {
        copy_kernel::launch::<Rt>(
            client,
            CubeCount::Static(GRID, 1, 1),
            CubeDim::new_1d(UNITS),
            4,
            ArrayArg::from_raw_parts(src.clone(), n / 4),
            ArrayArg::from_raw_parts(dst.clone(), n / 4),
            (n / 4) as u32,
        );
    });
    // The ceiling is only a ceiling if the whole buffer was copied.
    let (a, b) = (
        client.read_one(src).expect("read back"),
        client.read_one(dst).expect("read back"),
    );
    assert!(a[..] == b[..], "the copy kernel did not copy every byte");
    2.0 * (n * 4) as f64 / t.as_secs_f64()
}

/// Read-only bandwidth in bytes per second: a reduction that reads `bytes` bytes with
/// 16-byte loads and writes one float per unit. Decode attention only reads the cache, so this
/// is the ceiling its bandwidth fractions are taken against. The sum is checked against the
/// host's, so the ceiling counts only a kernel that really read every byte.
pub fn read_bandwidth(client: &ComputeClient<Rt>, bytes: usize) -> f64 {
    let n = bytes / 4;
    let src = random_handle::<f32>(client, n, 11);
    let sums = client.empty((GRID * UNITS) as usize * 4);
    let t = median_call_time(client, |_| unsafe {
        read_sum_kernel::launch::<Rt>(
            client,
            CubeCount::Static(GRID, 1, 1),
            CubeDim::new_1d(UNITS),
            4,
            ArrayArg::from_raw_parts(src.clone(), n / 4),
            ArrayArg::from_raw_parts(sums.clone(), (GRID * UNITS) as usize),
            (n / 4) as u32,
        );
    });
    let data = client.read_one(src).expect("read back");
    let expect: f64 = f32::from_bytes(&data).iter().map(|&x| x as f64).sum();
    let partial = client.read_one(sums).expect("read back");
    let got: f64 = f32::from_bytes(&partial).iter().map(|&x| x as f64).sum();
    assert!(
        (got - expect).abs() <= 1e-3 * (n as f64).sqrt().max(1.0) * 8.0,
        "the read kernel's sum {got} differs from the host's {expect}"
    );
    (n * 4) as f64 / t.as_secs_f64()
}

/// Read-only bandwidth at the size of one operand: the best, over a few grid sizes and with
/// each unit's loads batched by 4 and 8 (one pass of the grid), of the reduction of
/// [`read_bandwidth`] reading one `bytes`-byte buffer per call from `copies`
/// rotated buffers (so that L2 does not hold them between calls), in bytes per second. What a
/// kernel that only streams `bytes` bytes reaches per launch, ramp and tail included: the
/// reference for a small matrix's fraction of the large-buffer ceiling.
pub fn read_bandwidth_at_size(client: &ComputeClient<Rt>, bytes: usize, copies: usize) -> f64 {
    let n = bytes / 16 * 4;
    let bufs: Vec<Handle> = (0..copies.max(1))
        .map(|i| random_handle::<f32>(client, n, 300 + i as u32))
        .collect();
    let mut best = 0.0f64;
    let mut measure = |grid: u32, batch: usize| {
        let sums = client.empty((grid * UNITS) as usize * 4);
        let t = median_call_time(client, |i| unsafe {
            let (src, sums_arg) = (
                ArrayArg::from_raw_parts(bufs[i % bufs.len()].clone(), n / 4),
                ArrayArg::from_raw_parts(sums.clone(), (grid * UNITS) as usize),
            );
            let (count, dim) = (CubeCount::Static(grid, 1, 1), CubeDim::new_1d(UNITS));
            if batch == 1 {
                read_sum_kernel::launch::<Rt>(client, count, dim, 4, src, sums_arg, (n / 4) as u32);
            } else {
                read_sum_batched_kernel::launch::<Rt>(
                    client,
                    count,
                    dim,
                    4,
                    src,
                    sums_arg,
                    (n / 4) as u32,
                    batch,
                );
            }
        });
        best = best.max((n * 4) as f64 / t.as_secs_f64());
    };
    for grid in [528u32, 1056, 2112, 4096] {
        measure(grid, 1);
    }
    // Every unit's loads in one batch: one pass of the grid over the buffer.
    for batch in [4usize, 8] {
        let grid = (n / 4).div_ceil(batch * UNITS as usize).clamp(1, 65_535) as u32;
        measure(grid, batch);
    }
    best
}

/// The Burn backend of the model benches: f16 on the selected runtime, bare (kernels launched
/// at once).
#[cfg(feature = "cuda")]
pub type ModelBackend = sparsekv::cache::burn_cubecl::CubeBackend<Rt, half::f16, i32, u8>;
#[cfg(not(feature = "cuda"))]
pub type ModelBackend = sparsekv::cache::burn_cubecl::CubeBackend<Rt, half::f16, i32, u32>;
/// [`ModelBackend`] under Burn's operation fusion: Burn's own `Cuda<f16>` / `Wgpu<f16>` as its
/// default features make them.
#[cfg(feature = "cuda")]
pub type FusedModelBackend = sparsekv::cache::burn::backend::Cuda<half::f16, i32>;
#[cfg(not(feature = "cuda"))]
pub type FusedModelBackend = sparsekv::cache::burn::backend::Wgpu<half::f16, i32, u32>;

/// Batch of the model benches.
pub const MODEL_BATCH: usize = 8;
/// Tokens compressed at once by the sparse caches of the model benches (the cache default).
pub const CHUNK: usize = 64;

/// Decoder layers of the model benches: 32 (Llama-3-8B), or `SPARSEKV_BENCH_LAYERS`.
pub fn model_layers() -> usize {
    std::env::var("SPARSEKV_BENCH_LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick() { 2 } else { 32 })
}

/// Llama-3-8B's shape (hidden 4096, FFN 14336, 32/8 heads of 128, vocabulary 128256) with
/// `layers` layers and room for `max_seq` positions. Quick runs use a vocabulary of 8192:
/// software adapters cannot allocate the 1 GB embedding.
pub fn llama3_8b_shape(layers: usize, max_seq: usize) -> sparsekv::llama::LlamaConfig {
    sparsekv::llama::LlamaConfig {
        dim: 4096,
        hidden_dim: 14336,
        n_layers: layers,
        n_heads: 32,
        n_kv_heads: 8,
        vocab_size: if quick() { 8192 } else { 128_256 },
        max_seq,
        rope_theta: 500_000.0,
        rope_style: sparsekv::llama::RopeStyle::RotateHalf,
        rope_scaling: None,
        rms_eps: 1e-5,
    }
}

/// The configuration of the model benches' caches: `batch` sequences of up to `max_seq`
/// tokens, 8 KV heads of 128, f16, keys and values at `sparsity`, chunks of [`CHUNK`].
pub fn bench_cache_config(
    batch: usize,
    max_seq: usize,
    sparsity: f64,
) -> sparsekv::cache::KvCacheConfig {
    sparsekv::cache::KvCacheConfig::new(batch, 8, 128, max_seq)
        .with_sparsity(sparsity, sparsity)
        .with_chunk(CHUNK)
        .with_value_type(sparsekv::format::ValueType::F16)
}

/// `layers` caches of [`bench_cache_config`] made by `make` (`LayerCaches::sparse` or
/// `::dense`, say), each already holding `tokens` random tokens per sequence (appended at
/// once, as a prefill would).
pub fn filled_caches<B: SparseKvBackend, C: sparsekv::cache::KvCache<B>>(
    batch: usize,
    layers: usize,
    tokens: usize,
    max_seq: usize,
    sparsity: f64,
    make: impl FnOnce(usize, &sparsekv::cache::KvCacheConfig) -> Vec<C>,
) -> Vec<C> {
    use sparsekv::cache::burn::tensor::{Distribution, Tensor};
    let device = Default::default();
    let config = bench_cache_config(batch, max_seq, sparsity);
    let mut caches = make(layers, &config);
    for cache in &mut caches {
        let shape = [batch, 8, tokens, 128];
        let k = Tensor::<B, 4>::random(shape, Distribution::Uniform(-1.0, 1.0), &device);
        let v = Tensor::<B, 4>::random(shape, Distribution::Uniform(-1.0, 1.0), &device);
        cache.append(k, v).expect("fill the cache");
    }
    caches
}

/// Times `steps` decode steps of `model` (one token per sequence), each synchronised; returns
/// the per-step times. The caches grow by one token per step.
pub fn decode_step_times<B: SparseKvBackend, C: sparsekv::cache::KvCache<B>>(
    model: &sparsekv::llama::Llama<B>,
    caches: &mut [C],
    steps: usize,
) -> Vec<Duration> {
    decode_step_host_times(model, caches, steps)
        .into_iter()
        .map(|t| t.0)
        .collect()
}

/// [`decode_step_times`] with, per step, the host time until the step's launches were all
/// issued (before the device is synchronised).
pub fn decode_step_host_times<B: SparseKvBackend, C: sparsekv::cache::KvCache<B>>(
    model: &sparsekv::llama::Llama<B>,
    caches: &mut [C],
    steps: usize,
) -> Vec<(Duration, Duration)> {
    let device = Default::default();
    let batch = caches[0].lengths().len();
    (0..steps)
        .map(|_| {
            let t = Instant::now();
            let logits = model
                .decode_batch(&vec![1; batch], &vec![true; batch], caches)
                .expect("decode step");
            drop(logits);
            let issued = t.elapsed();
            B::sync(&device).expect("device sync");
            (t.elapsed(), issued)
        })
        .collect()
}

/// Median and mean of `times`.
pub fn median_mean(times: &[Duration]) -> (Duration, Duration) {
    let mut sorted = times.to_vec();
    sorted.sort();
    let mean = times.iter().sum::<Duration>() / times.len().max(1) as u32;
    (sorted[sorted.len() / 2], mean)
}
