//! The skinny matmul of a decode step (`x · wᵀ`, `x` `[M, K]`, weights `[N, K]`) on the
//! projection shapes of Llama-3-8B (fused QKV, output, fused gate+up, down, output head) at
//! M in {1, 8, 32}, f16 and bf16 (where the device has them), against the read-only ceiling
//! measured in the same run; at M = 8, f16, Burn's own matmul on the same shapes (what the
//! model used before) as the peer.
//!
//! Weights are rotated (independent copies, at least 256 MB in all) so that L2 does not hold
//! them between calls. The table has the median per call (15 batches of 20 back-to-back calls
//! after 10 warm-up calls, device synchronised around each batch), the weight bytes over that
//! time and its fraction of the read-only ceiling. Criterion (`iter_custom`) runs the M = 8, f16
//! rows.
//!
//! Before the products, f16: the read-only reduction of `common` on each matrix's bytes
//! (rotated copies, the best of a few grid sizes and load batches), the most a launch
//! streaming that many bytes reaches.
//!
//! `SPARSEKV_BENCH_QUICK=1`: small shapes (software adapters). `SPARSEKV_BENCH_ONLY=out,qkv`:
//! only those matrices. `SPARSEKV_BENCH_SWEEP=1` adds, at M = 1 and 8, f16, a sweep of tunings
//! (kernel, rows per plane, planes per cube, unroll) of every shape; `=fragments` sweeps the
//! fragment kernel only. `SPARSEKV_BENCH_LAUNCH=1` measures the launch path instead (see
//! `launch_probe`), `SPARSEKV_BENCH_PROFILE=out` launches a few calls for a profiler (see
//! `profile_calls`).

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{
    ModelBackend, Rt, backend_name, median_call_times, median_call_times_in_batches, quick,
    random_handle, read_bandwidth, read_bandwidth_at_size, sync,
};
use criterion::{Criterion, criterion_group, criterion_main};
use sparsekv::kernels::cubecl;
use sparsekv::kernels::cubecl::prelude::*;
use sparsekv::kernels::cubecl::server::Handle;
use sparsekv::kernels::{
    FloatElement, SkinnyInput, SkinnyKernel, SkinnyShape, SkinnyTuning, skinny_matmul,
    skinny_matmul_with, supports_type,
};

/// Weight bytes the rotated copies of a matrix add up to, at least.
const ROTATION_BYTES: usize = 256 << 20;

/// `(name, N, K)` of Llama-3-8B's decode projections, as the model stores them.
const SHAPES: [(&str, usize, usize); 5] = [
    ("qkv", 6144, 4096),
    ("out", 4096, 4096),
    ("gate+up", 28672, 4096),
    ("down", 4096, 14336),
    ("head", 128_256, 4096),
];
const QUICK_SHAPES: [(&str, usize, usize); 2] = [("small", 512, 256), ("tall", 4096, 512)];

struct Weights {
    copies: Vec<Handle>,
    x: Handle,
    out: Handle,
}

fn weights<F: FloatElement>(client: &ComputeClient<Rt>, m: usize, n: usize, k: usize) -> Weights {
    let bytes = n * k * F::size_bytes();
    let count = ROTATION_BYTES.div_ceil(bytes).clamp(1, 16);
    let copies = (0..count)
        .map(|i| random_handle::<F>(client, n * k, 100 + i as u32))
        .collect();
    let x = random_handle::<F>(client, m * k, 7);
    let out = client.empty(m * n * F::size_bytes());
    sync(client);
    Weights { copies, x, out }
}

/// Call `i` of a series: the product with the `i`-th rotated copy of the weights.
fn launch<F: FloatElement>(
    client: &ComputeClient<Rt>,
    w: &Weights,
    shape: SkinnyShape,
    tuning: Option<SkinnyTuning>,
    i: usize,
) {
    let copy = &w.copies[i % w.copies.len()];
    skinny_matmul_with::<Rt, F>(
        client,
        shape,
        SkinnyInput::Plain,
        &w.x,
        copy,
        None,
        &w.out,
        tuning,
    )
    .expect("launch");
}

/// Median time per call and the host's share (see `median_call_times`).
fn time_skinny<F: FloatElement>(
    client: &ComputeClient<Rt>,
    w: &Weights,
    shape: SkinnyShape,
    tuning: Option<SkinnyTuning>,
) -> (Duration, Duration) {
    median_call_times(client, |i| launch::<F>(client, w, shape, tuning, i))
}

/// Burn's matmul on the same product, as the model ran it before: `x [1, m, k]` times the
/// transposed `[n, k]` weights.
fn time_burn_matmul(m: usize, n: usize, k: usize) -> Duration {
    use sparsekv::cache::burn::tensor::backend::Backend;
    use sparsekv::cache::burn::tensor::{Distribution, Tensor};
    let device = Default::default();
    let count = ROTATION_BYTES.div_ceil(n * k * 2).clamp(1, 16);
    let ws: Vec<Tensor<ModelBackend, 2>> = (0..count)
        .map(|_| Tensor::random([n, k], Distribution::Uniform(-1.0, 1.0), &device))
        .collect();
    let x = Tensor::<ModelBackend, 3>::random([1, m, k], Distribution::Uniform(-1.0, 1.0), &device);
    let call = |i: usize| {
        let y = x
            .clone()
            .matmul(ws[i % count].clone().transpose().unsqueeze());
        drop(y);
    };
    for i in 0..10 {
        call(i);
    }
    ModelBackend::sync(&device).expect("sync");
    let mut times: Vec<Duration> = (0..15)
        .map(|_| {
            let t = Instant::now();
            for i in 0..20 {
                call(i);
            }
            ModelBackend::sync(&device).expect("sync");
            t.elapsed() / 20
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

fn row(
    name: &str,
    SkinnyShape { m, n, k }: SkinnyShape,
    es: usize,
    how: &str,
    (t, host): (Duration, Option<Duration>),
    ceiling: f64,
) -> String {
    let bw = (n * k * es) as f64 / t.as_secs_f64();
    let host = host.map_or("-".into(), |h| format!("{:.1}", h.as_secs_f64() * 1e6));
    format!(
        "| {name} | {m} | {n} | {k} | {how} | {:.1} | {host} | {:.0} | {:.1}% |\n",
        t.as_secs_f64() * 1e6,
        bw / 1e9,
        100.0 * bw / ceiling
    )
}

fn sweep_type<F: FloatElement>(
    c: &mut Criterion,
    client: &ComputeClient<Rt>,
    ceiling: f64,
    table: &mut String,
) {
    if !supports_type::<Rt, F>(client) {
        table.push_str(&format!("({} not supported by this device)\n", F::name()));
        return;
    }
    let only = std::env::var("SPARSEKV_BENCH_ONLY").ok();
    let all: &[(&str, usize, usize)] = if quick() { &QUICK_SHAPES } else { &SHAPES };
    let wanted = |name: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|s| s == name))
    };
    let shapes: Vec<_> = all.iter().filter(|s| wanted(s.0)).copied().collect();
    let sweep = std::env::var_os("SPARSEKV_BENCH_SWEEP").is_some();
    if F::name() == "f16" {
        // What a kernel that only reads reaches on each matrix's bytes (rotated copies, as
        // the weights are): the most a skinny matmul of that shape can reach per launch.
        for &(name, n, k) in &shapes {
            let bytes = n * k * F::size_bytes();
            let copies = ROTATION_BYTES.div_ceil(bytes).clamp(1, 16);
            let bw = read_bandwidth_at_size(client, bytes, copies);
            table.push_str(&format!(
                "| {name} | - | {n} | {k} | read-only reduction, same bytes | {:.1} | - | {:.0} | {:.1}% |\n",
                bytes as f64 / bw * 1e6,
                bw / 1e9,
                100.0 * bw / ceiling
            ));
        }
    }
    for &m in &[1usize, 8, 32] {
        for &(name, n, k) in &shapes {
            let w = weights::<F>(client, m, n, k);
            let shape = SkinnyShape { m, n, k };
            let es = F::size_bytes();
            let (t, host) = time_skinny::<F>(client, &w, shape, None);
            table.push_str(&row(
                name,
                SkinnyShape { m, n, k },
                es,
                &format!("skinny {}", F::name()),
                (t, Some(host)),
                ceiling,
            ));
            if m == 8 && F::name() == "f16" {
                let mut group = c.benchmark_group("skinny_matmul");
                group.sample_size(10);
                group.bench_function(format!("{name}/m{m}"), |b| {
                    b.iter_custom(|iters| {
                        sync(client);
                        let start = Instant::now();
                        for i in 0..iters as usize {
                            let copy = &w.copies[i % w.copies.len()];
                            skinny_matmul::<Rt, F>(client, shape, &w.x, copy, &w.out)
                                .expect("launch");
                        }
                        sync(client);
                        start.elapsed()
                    })
                });
                group.finish();
            }
            if sweep && (m == 1 || m == 8) && F::name() == "f16" {
                sweep_tunings::<F>(client, &w, shape, name, ceiling, table);
            }
            if m == 8 && F::name() == "f16" {
                drop(w);
                let t = time_burn_matmul(m, n, k);
                table.push_str(&row(
                    name,
                    SkinnyShape { m, n, k },
                    es,
                    "Burn matmul f16",
                    (t, None),
                    ceiling,
                ));
            }
            println!("{}", table.lines().last().unwrap_or_default());
        }
    }
}

/// Every tuning of the sweep (CUDA-core and tensor-core kernels) on one shape; kernels the
/// device does not have are left out.
fn sweep_tunings<F: FloatElement>(
    client: &ComputeClient<Rt>,
    w: &Weights,
    shape: SkinnyShape,
    name: &str,
    ceiling: f64,
    table: &mut String,
) {
    let mut tunings = Vec::new();
    let only_fragments = std::env::var("SPARSEKV_BENCH_SWEEP").is_ok_and(|v| v == "fragments");
    if !only_fragments {
        for rows_per_plane in [2, 4] {
            for planes in [2, 4] {
                for unroll in [1, 2, 4] {
                    tunings.push(SkinnyTuning {
                        kernel: SkinnyKernel::Simt,
                        rows_per_plane,
                        planes,
                        unroll,
                    });
                }
            }
        }
        for planes in [4, 8, 16, 32] {
            for unroll in [1, 2, 4] {
                tunings.push(SkinnyTuning {
                    kernel: SkinnyKernel::TensorCore,
                    rows_per_plane: 1,
                    planes,
                    unroll,
                });
            }
        }
    }
    // 32 planes (1024 units: at most 64 registers a unit) only with the smaller batches.
    for planes in [4, 8, 16, 32] {
        for unroll in [2, 4, 8] {
            if planes == 32 && unroll == 8 {
                continue;
            }
            tunings.push(SkinnyTuning {
                kernel: SkinnyKernel::Fragments,
                rows_per_plane: 1,
                planes,
                unroll,
            });
        }
    }
    let SkinnyShape { m, n, k } = shape;
    for tuning in tunings {
        let how = match tuning.kernel {
            SkinnyKernel::TensorCore => format!("tc p{} u{}", tuning.planes, tuning.unroll),
            SkinnyKernel::Fragments => format!("frag p{} u{}", tuning.planes, tuning.unroll),
            _ => format!(
                "simt r{} p{} u{}",
                tuning.rows_per_plane, tuning.planes, tuning.unroll
            ),
        };
        let probe = skinny_matmul_with::<Rt, F>(
            client,
            shape,
            SkinnyInput::Plain,
            &w.x,
            &w.copies[0],
            None,
            &w.out,
            Some(tuning),
        );
        if probe.is_err() {
            continue;
        }
        let (t, host) = time_skinny::<F>(client, w, shape, Some(tuning));
        table.push_str(&row(
            name,
            SkinnyShape { m, n, k },
            F::size_bytes(),
            &how,
            (t, Some(host)),
            ceiling,
        ));
    }
}

/// `SPARSEKV_BENCH_PROFILE=NAME[:M]` (a matrix of `SHAPES`, M = 8 unless given; `1`: the down
/// projection): five calls each of the CUDA-core kernel, of the kernel the launcher chooses
/// on its own (the fragment kernel from 8 rows on) and of the `cmma` kernel (16 planes,
/// unroll 4), f16, nothing else (for `ncu --kernel-name regex:skinny`).
fn profile_calls(client: &ComputeClient<Rt>, target: &str) {
    let (name, m) = target.split_once(':').unwrap_or((target, "8"));
    let m: usize = m
        .parse()
        .expect("SPARSEKV_BENCH_PROFILE=NAME[:M], M a number");
    let name = if name == "1" { "down" } else { name };
    let &(_, n, k) = SHAPES
        .iter()
        .find(|(s, _, _)| *s == name)
        .expect("SPARSEKV_BENCH_PROFILE names a matrix of SHAPES");
    let w = weights::<half::f16>(client, m, n, k);
    let shape = SkinnyShape { m, n, k };
    let simt = SkinnyTuning {
        kernel: SkinnyKernel::Simt,
        rows_per_plane: 4,
        planes: 2,
        unroll: 2,
    };
    let cmma = SkinnyTuning {
        kernel: SkinnyKernel::TensorCore,
        rows_per_plane: 1,
        planes: 16,
        unroll: 4,
    };
    for tuning in [Some(simt), None, Some(cmma)] {
        for i in 0..5 {
            launch::<half::f16>(client, &w, shape, tuning, i);
        }
        sync(client);
    }
}

/// One unit writes one value: a launch with (almost) no device work.
#[cube(launch)]
fn touch_kernel(out: &mut Array<f32>) {
    if ABSOLUTE_POS == 0 {
        out[0] = 1.0;
    }
}

/// `SPARSEKV_BENCH_LAUNCH=1`: where the time of a short launch goes. An empty launch back to
/// back in batches of several sizes (CubeCL 0.10 hands launches to its device thread 32 at a
/// time, or when something synchronises), the same with a blocking `flush` after each launch
/// (a round trip to the device thread), and the small projections in batches of 20 and 200.
fn launch_probe(client: &ComputeClient<Rt>, ceiling: f64) {
    let out = client.empty(4);
    let touch = |_: usize| {
        touch_kernel::launch::<Rt>(
            client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(32),
            unsafe { ArrayArg::from_raw_parts(out.clone(), 1) },
        );
    };
    let mut table = String::from(
        "\nLaunch path (CUDA: one launch = one task for CubeCL's device thread)\n\n\
         | what | calls per batch | us per call (median) | host us to issue |\n|---|---|---|---|\n",
    );
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    for calls in [1, 20, 32, 64, 200, 1000] {
        let (t, host) = median_call_times_in_batches(client, calls, touch);
        table.push_str(&format!(
            "| empty launch | {calls} | {:.2} | {:.2} |\n",
            us(t),
            us(host)
        ));
    }
    for calls in [20, 200] {
        let (t, host) = median_call_times_in_batches(client, calls, |i| {
            touch(i);
            client.flush().expect("flush");
        });
        table.push_str(&format!(
            "| empty launch + blocking flush | {calls} | {:.2} | {:.2} |\n",
            us(t),
            us(host)
        ));
    }
    println!("{table}");
    let mut rows = String::from(
        "| matrix | M | N | K | calls per batch | us (median) | host us to issue | weight GB/s | of read-only |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    let shapes = if quick() {
        vec![(1, QUICK_SHAPES[0]), (8, QUICK_SHAPES[1])]
    } else {
        vec![
            (1, SHAPES[1]),
            (8, SHAPES[1]),
            (8, SHAPES[0]),
            (8, SHAPES[3]),
        ]
    };
    for (m, (name, n, k)) in shapes {
        let w = weights::<half::f16>(client, m, n, k);
        let shape = SkinnyShape { m, n, k };
        for calls in [20, 200] {
            let (t, host) = median_call_times_in_batches(client, calls, |i| {
                launch::<half::f16>(client, &w, shape, None, i)
            });
            let bw = (n * k * 2) as f64 / t.as_secs_f64();
            rows.push_str(&format!(
                "| {name} | {m} | {n} | {k} | {calls} | {:.1} | {:.1} | {:.0} | {:.1}% |\n",
                us(t),
                us(host),
                bw / 1e9,
                100.0 * bw / ceiling
            ));
        }
    }
    println!("{rows}");
}

fn skinny(c: &mut Criterion) {
    let client = Rt::client(&Default::default());
    if let Ok(target) = std::env::var("SPARSEKV_BENCH_PROFILE") {
        profile_calls(&client, &target);
        return;
    }
    if std::env::var_os("SPARSEKV_BENCH_LAUNCH").is_some() {
        let ceiling = read_bandwidth(&client, if quick() { 64 << 20 } else { 1 << 30 });
        launch_probe(&client, ceiling);
        return;
    }
    let ceiling = read_bandwidth(&client, if quick() { 64 << 20 } else { 1 << 30 });
    let mut table = format!(
        "\nSkinny matmul, {}; read-only ceiling {:.0} GB/s\n\n\
         | matrix | M | N | K | kernel | us (median) | host us to issue | weight GB/s | of read-only |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        backend_name(),
        ceiling / 1e9
    );
    sweep_type::<half::f16>(c, &client, ceiling, &mut table);
    sweep_type::<half::bf16>(c, &client, ceiling, &mut table);
    println!("{table}");
}

criterion_group!(benches, skinny);
criterion_main!(benches);
