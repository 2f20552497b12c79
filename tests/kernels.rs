//! Kernel tests against the f64 oracle, on the runtime the features select (`cuda` if enabled,
//! else `wgpu`: lavapipe in CI). Inputs are random with a fresh seed per run (set
//! `SPARSEKV_SEED` to replay one; failures print it); outputs are poisoned before each launch
//! so an unwritten element fails; NaN never passes. One test runs the prompt attention kernel
//! inside a model (see its note on why here).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::needless_range_loop)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sparsekv::format::oracle::{self, CompressedBlock, DenseBlock, HeadCache};
use sparsekv::format::{HeadDim, PromptShape, Sparsity, keep_count, layout};
use sparsekv::kernels::cubecl::prelude::*;
use sparsekv::kernels::cubecl::server::Handle;
use sparsekv::kernels::{
    AttentionArgs, CompressArgs, CompressTarget, CopyRowsArgs, DecodeKernel, DenseCacheArgs,
    ExpandArgs, FloatElement, KernelError, RopeShape, RopeStyle, SkinnyInput, SkinnyKernel,
    SkinnyShape, SkinnyTuning, SparseSegmentArgs, decode_attention, decode_attention_with,
    expand_context, prefill_attention, prune_compress, rms_norm, rope_split, skinny_matmul_with,
    supports_type, swiglu,
};

mod common;

use common::{Rt, rel_err, seed, standard_normal};

fn client() -> ComputeClient<Rt> {
    Rt::client(&Default::default())
}

/// Float types as the tests see them: conversion from and to f64, and the error bound.
trait TestFloat: FloatElement + Copy {
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    /// Bound on ‖out − ref‖ / ‖ref‖ for attention outputs in this type.
    const ATTENTION_TOL: f64;
    /// The spacing of this type's subnormal numbers: an output rounded to it may be off by
    /// half of that whatever its magnitude (f16's is 2^-24, so tiny products lose most of
    /// their relative precision).
    const SUBNORMAL_STEP: f64;
}

impl TestFloat for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    const ATTENTION_TOL: f64 = 1e-5;
    const SUBNORMAL_STEP: f64 = 1.401298464324817e-45; // 2^-149
}

impl TestFloat for half::f16 {
    fn from_f64(x: f64) -> Self {
        half::f16::from_f64(x)
    }
    fn to_f64(self) -> f64 {
        half::f16::to_f64(self)
    }
    const ATTENTION_TOL: f64 = 2e-3;
    const SUBNORMAL_STEP: f64 = 5.960464477539063e-8; // 2^-24
}

impl TestFloat for half::bf16 {
    fn from_f64(x: f64) -> Self {
        half::bf16::from_f64(x)
    }
    fn to_f64(self) -> f64 {
        half::bf16::to_f64(self)
    }
    const ATTENTION_TOL: f64 = 1e-2;
    const SUBNORMAL_STEP: f64 = 9.183549615799121e-41; // 2^-133
}

/// Standard normal values, rounded to `F` (the oracle sees exactly what the kernel sees).
fn normals<F: TestFloat>(rng: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| TestFloat::to_f64(F::from_f64(standard_normal(rng))))
        .collect()
}

fn upload<F: TestFloat>(client: &ComputeClient<Rt>, v: &[f64]) -> Handle {
    let typed: Vec<F> = v.iter().map(|&x| F::from_f64(x)).collect();
    client.create_from_slice(F::as_bytes(&typed))
}

/// A Burn tensor's elements (of any float type) as f64.
fn tensor_f64<B: sparsekv::cache::burn::tensor::backend::Backend, const D: usize>(
    t: sparsekv::cache::burn::tensor::Tensor<B, D>,
) -> Vec<f64> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32")
        .into_iter()
        .map(f64::from)
        .collect()
}

fn read<F: TestFloat>(client: &ComputeClient<Rt>, h: Handle) -> Vec<f64> {
    let bytes = client.read_one(h).expect("read back");
    F::from_bytes(&bytes)
        .iter()
        .map(|&x| TestFloat::to_f64(x))
        .collect()
}

fn read_u32(client: &ComputeClient<Rt>, h: Handle) -> Vec<u32> {
    let bytes = client.read_one(h).expect("read back");
    u32::from_bytes(&bytes).to_vec()
}

const DIMS: [usize; 5] = [8, 16, 64, 128, 256];
const SPARSITIES: [f64; 5] = [0.0, 0.3, 0.5, 0.7, 0.9];

/// Compresses two consecutive chunks per sequence into poisoned streams (the second at an
/// offset that is generally not word-aligned for narrow rows) and checks every bit and value
/// of the compressed range against the oracle; half the cases compress a pair of targets
/// (a cache's keys and values: other sources, other sparsities) in each launch.
fn compress_case<F: TestFloat>(client: &ComputeClient<Rt>, rng: &mut StdRng) -> Result<(), String> {
    let d = DIMS[rng.random_range(0..DIMS.len())];
    let hd = HeadDim::new(d).map_err(|e| e.to_string())?;
    let targets = if rng.random_bool(0.5) { 2 } else { 1 };
    let sparsities: Vec<Sparsity> = (0..targets)
        .map(|_| Sparsity::new(SPARSITIES[rng.random_range(0..SPARSITIES.len())]))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let (seqs, kv_heads) = (rng.random_range(1..=3usize), rng.random_range(1..=3usize));
    let streams = seqs * kv_heads;
    let first: Vec<u32> = (0..seqs).map(|_| rng.random_range(0..=70)).collect();
    let second: Vec<u32> = (0..seqs).map(|_| rng.random_range(0..=70)).collect();
    let src_offset: Vec<u32> = (0..seqs).map(|_| rng.random_range(0..=5)).collect();
    let cap = layout::aligned_capacity(150);
    let src_tokens = 150;
    let bitmap_stride = layout::bitmap_words(cap, hd);
    // Per target: its source rows (host and device), bitmap and values (poisoned). Half the
    // cases round the rows to quarters in [-2, 2]: many equal magnitudes (zeros of both
    // signs among them), so ties go to the lower index as the oracle says.
    let ties = rng.random_bool(0.5);
    let srcs: Vec<Vec<f64>> = (0..targets)
        .map(|_| {
            let mut x = normals::<F>(rng, streams * src_tokens * d);
            if ties {
                x.iter_mut()
                    .for_each(|v| *v = ((*v * 4.0).round() / 4.0).clamp(-2.0, 2.0));
            }
            x
        })
        .collect();
    let src_h: Vec<Handle> = srcs.iter().map(|x| upload::<F>(client, x)).collect();
    let bitmap_h: Vec<Handle> = (0..targets)
        .map(|_| {
            client.create_from_slice(u32::as_bytes(&vec![
                0xDEAD_BEEFu32;
                streams * bitmap_stride
            ]))
        })
        .collect();
    let values_h: Vec<Handle> = sparsities
        .iter()
        .map(|&sp| upload::<F>(client, &vec![f64::NAN; streams * cap * keep_count(sp, hd)]))
        .collect();
    let src_start2: Vec<u32> = (0..seqs).map(|i| src_offset[i] + first[i]).collect();
    for (src_start, dst_start, counts) in [
        (src_offset.clone(), vec![0; seqs], first.clone()),
        (src_start2, first.clone(), second.clone()),
    ] {
        let args = CompressArgs {
            sequences: seqs,
            kv_heads,
            head_dim: hd,
            src_stride: src_tokens * d,
            src_start: &src_start,
            dst_start: &dst_start,
            counts: &counts,
            capacity: cap,
        };
        let launch: Vec<CompressTarget<'_>> = (0..targets)
            .map(|i| CompressTarget {
                src: &src_h[i],
                bitmap: &bitmap_h[i],
                values: &values_h[i],
                sparsity: sparsities[i],
            })
            .collect();
        prune_compress::<Rt, F>(client, &args, &launch).map_err(|e| e.to_string())?;
    }
    for (i, &s) in sparsities.iter().enumerate() {
        let keep = keep_count(s, hd);
        let bits = read_u32(client, bitmap_h[i].clone());
        let vals = read::<F>(client, values_h[i].clone());
        for st in 0..streams {
            let seq = st / kv_heads;
            let n = (first[seq] + second[seq]) as usize;
            let start = (st * src_tokens + src_offset[seq] as usize) * d;
            let block = DenseBlock::new(srcs[i][start..start + n * d].to_vec(), n, hd)
                .map_err(|e| e.to_string())?;
            let expect = oracle::compress(&block, s);
            let words = &bits[st * bitmap_stride..][..layout::bitmap_words(n, hd)];
            let got_vals = &vals[st * cap * keep..][..n * keep];
            let got = CompressedBlock::from_parts(words.to_vec(), got_vals.to_vec(), n, hd, keep);
            // The last word may hold poison past the compressed range: compare bit by bit.
            for t in 0..n {
                for j in 0..d {
                    let (w, b) = layout::bit_position(t, j, hd);
                    let bit = words[w] >> b & 1 == 1;
                    if bit != expect.is_kept(t, j) {
                        return Err(format!(
                            "target {i} of {targets}, d {d} s {} ties {ties} stream {st} token {t} element {j}: bit {bit}",
                            s.get()
                        ));
                    }
                }
            }
            if got_vals != expect.values() {
                return Err(format!(
                    "target {i} of {targets}, d {d} s {} ties {ties} stream {st}: packed values differ ({got:?})",
                    s.get()
                ));
            }
        }
    }
    Ok(())
}

struct AttentionCase {
    d: usize,
    batch: usize,
    kv_heads: usize,
    group: usize,
    ks: Sparsity,
    vs: Sparsity,
    comp: Vec<u32>,
    win: Vec<u32>,
    /// Query rows that read other sequences' streams (`row_sequences`): row `r` reads
    /// sequence `rows[r]` with its lengths. `None`: row `b` reads sequence `b`.
    rows: Option<Vec<u32>>,
}

impl AttentionCase {
    /// The case's shape and lengths, for failure messages.
    fn describe(&self) -> String {
        format!(
            "d {} batch {} kv {} group {} ks {} vs {} comp {:?} win {:?} rows {:?}",
            self.d,
            self.batch,
            self.kv_heads,
            self.group,
            self.ks.get(),
            self.vs.get(),
            self.comp,
            self.win,
            self.rows
        )
    }
}

fn random_attention_case(rng: &mut StdRng, sparse: bool) -> AttentionCase {
    let d = DIMS[rng.random_range(0..DIMS.len())];
    let batch = rng.random_range(1..=4usize);
    let pick_len = |rng: &mut StdRng| match rng.random_range(0..6) {
        0 => 0,
        1 => 1,
        2 => rng.random_range(2..200),
        3 => rng.random_range(200..2000),
        _ => rng.random_range(0..700),
    };
    let comp: Vec<u32> = (0..batch)
        .map(|_| if sparse { pick_len(rng) } else { 0 })
        .collect();
    let win: Vec<u32> = (0..batch)
        .map(|i| {
            let w = if sparse {
                rng.random_range(0..=64)
            } else {
                pick_len(rng)
            };
            if comp[i] + w == 0 { 1 } else { w }
        })
        .collect();
    let sp = |rng: &mut StdRng| {
        Sparsity::new(SPARSITIES[rng.random_range(0..SPARSITIES.len())]).unwrap_or(Sparsity::DENSE)
    };
    // Half the cases map their query rows to random sequences (repeats allowed), as a prompt
    // chunk's rows do.
    let rows = rng.random_bool(0.5).then(|| {
        (0..rng.random_range(1..=batch + 2))
            .map(|_| rng.random_range(0..batch as u32))
            .collect()
    });
    AttentionCase {
        rows,
        d,
        batch,
        kv_heads: rng.random_range(1..=2),
        group: [1, 2, 4, 8][rng.random_range(0..4)],
        ks: sp(rng),
        vs: sp(rng),
        comp,
        win,
    }
}

/// Runs one decode-attention case (sparse if the case has a segment) and returns the relative
/// error against the oracle.
fn attention_case<F: TestFloat>(
    client: &ComputeClient<Rt>,
    rng: &mut StdRng,
    c: &AttentionCase,
    sparse: bool,
    kernel: DecodeKernel,
) -> Result<f64, String> {
    let hd = HeadDim::new(c.d).map_err(|e| e.to_string())?;
    let d = c.d;
    let q_heads = c.kv_heads * c.group;
    let streams = c.batch * c.kv_heads;
    let comp_cap = layout::aligned_capacity(c.comp.iter().copied().max().unwrap_or(0) as usize + 3);
    let win_cap = c.win.iter().copied().max().unwrap_or(0) as usize + 2;
    let (kk, vk) = (keep_count(c.ks, hd), keep_count(c.vs, hd));
    let bitmap_stride = layout::bitmap_words(comp_cap, hd);
    let mut kbits = vec![0u32; streams * bitmap_stride];
    let mut vbits = kbits.clone();
    let mut kvals = vec![f64::NAN; streams * comp_cap * kk];
    let mut vvals = vec![f64::NAN; streams * comp_cap * vk];
    let mut kwin = vec![f64::NAN; streams * win_cap * d];
    let mut vwin = kwin.clone();
    let mut cache = Vec::new();
    for b in 0..c.batch {
        let mut heads = Vec::new();
        for h in 0..c.kv_heads {
            let st = b * c.kv_heads + h;
            let (tc, tw) = (c.comp[b] as usize, c.win[b] as usize);
            let block = |rng: &mut StdRng, t| {
                DenseBlock::new(normals::<F>(rng, t * d), t, hd).map_err(|e| e.to_string())
            };
            let kseg = oracle::compress(&block(rng, tc)?, c.ks);
            let vseg = oracle::compress(&block(rng, tc)?, c.vs);
            let (kw, vw) = (block(rng, tw)?, block(rng, tw)?);
            kbits[st * bitmap_stride..][..kseg.bitmap().len()].copy_from_slice(kseg.bitmap());
            vbits[st * bitmap_stride..][..vseg.bitmap().len()].copy_from_slice(vseg.bitmap());
            kvals[st * comp_cap * kk..][..kseg.values().len()].copy_from_slice(kseg.values());
            vvals[st * comp_cap * vk..][..vseg.values().len()].copy_from_slice(vseg.values());
            kwin[st * win_cap * d..][..tw * d].copy_from_slice(kw.data());
            vwin[st * win_cap * d..][..tw * d].copy_from_slice(vw.data());
            heads.push(HeadCache {
                k_segment: kseg,
                v_segment: vseg,
                k_window: kw,
                v_window: vw,
            });
        }
        cache.push(heads);
    }
    // The query rows, each with its sequence's cache and lengths.
    let identity: Vec<u32> = (0..c.batch as u32).collect();
    let rows = c.rows.as_deref().unwrap_or(&identity);
    let row_cache: Vec<_> = rows.iter().map(|&s| cache[s as usize].clone()).collect();
    let row_comp: Vec<u32> = rows.iter().map(|&s| c.comp[s as usize]).collect();
    let row_win: Vec<u32> = rows.iter().map(|&s| c.win[s as usize]).collect();
    let q = normals::<F>(rng, rows.len() * q_heads * d);
    let expect =
        oracle::sparse_decode_attention(&q, q_heads, &row_cache).map_err(|e| e.to_string())?;

    let q_h = upload::<F>(client, &q);
    let out_h = upload::<F>(client, &vec![f64::NAN; q.len()]);
    let (kw_h, vw_h) = (upload::<F>(client, &kwin), upload::<F>(client, &vwin));
    let (kb_h, vb_h) = (
        client.create_from_slice(u32::as_bytes(&kbits)),
        client.create_from_slice(u32::as_bytes(&vbits)),
    );
    let (kv_h, vv_h) = (upload::<F>(client, &kvals), upload::<F>(client, &vvals));
    let segment = SparseSegmentArgs {
        k_bitmap: &kb_h,
        k_values: &kv_h,
        v_bitmap: &vb_h,
        v_values: &vv_h,
        bitmap_stride,
        k_values_stride: comp_cap * kk,
        v_values_stride: comp_cap * vk,
        k_sparsity: c.ks,
        v_sparsity: c.vs,
    };
    let args = AttentionArgs {
        batch: rows.len(),
        q_heads,
        kv_heads: c.kv_heads,
        head_dim: hd,
        compressed_lens: &row_comp,
        window_lens: &row_win,
        row_sequences: c.rows.as_deref(),
    };
    let window = DenseCacheArgs {
        k: &kw_h,
        v: &vw_h,
        stride: win_cap * d,
    };
    decode_attention_with::<Rt, F>(
        client,
        &args,
        &q_h,
        sparse.then_some(&segment),
        &window,
        &out_h,
        kernel,
    )
    .map_err(|e| e.to_string())?;
    Ok(rel_err(&read::<F>(client, out_h), &expect))
}

fn run_cases<F: TestFloat>(
    name: &str,
    cases: usize,
    mut case: impl FnMut(&ComputeClient<Rt>, &mut StdRng) -> Result<(), String>,
) {
    let client = client();
    if !supports_type::<Rt, F>(&client) {
        eprintln!(
            "{name}: {} not supported by this device; checked the typed error instead",
            F::name()
        );
        return;
    }
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..cases {
        if let Err(e) = case(&client, &mut rng) {
            panic!(
                "{name} [{}], case {i}, SPARSEKV_SEED={seed}: {e}",
                F::name()
            );
        }
    }
}

/// Random cases per attention test: the full count on CUDA, 60% of it on the software
/// rasteriser (lavapipe compiles almost every case's kernel anew, and CI has a time limit).
fn case_count(cuda_cases: usize) -> usize {
    if cfg!(feature = "cuda") {
        cuda_cases
    } else {
        (cuda_cases * 3).div_ceil(5)
    }
}

fn attention_cases<F: TestFloat>(cases: usize, sparse: bool, kernel: DecodeKernel) {
    let name = format!(
        "{} attention ({kernel:?} kernel)",
        if sparse { "sparse" } else { "dense" }
    );
    run_cases::<F>(&name, case_count(cases), |client, rng| {
        let c = random_attention_case(rng, sparse);
        let err = attention_case::<F>(client, rng, &c, sparse, kernel)?;
        if err < F::ATTENTION_TOL {
            Ok(())
        } else {
            Err(format!(
                "rel err {err:e} > {:e}: {}",
                F::ATTENTION_TOL,
                c.describe()
            ))
        }
    });
}

#[test]
fn prune_compress_matches_oracle_f32() {
    run_cases::<f32>("prune_compress", 30, compress_case::<f32>);
}

#[test]
fn prune_compress_matches_oracle_f16() {
    run_cases::<half::f16>("prune_compress", 20, compress_case::<half::f16>);
}

#[test]
fn sparse_attention_matches_oracle_f32() {
    attention_cases::<f32>(40, true, DecodeKernel::Auto);
}

#[test]
fn sparse_attention_matches_oracle_f16() {
    attention_cases::<half::f16>(25, true, DecodeKernel::Auto);
}

#[test]
fn sparse_attention_matches_oracle_bf16() {
    attention_cases::<half::bf16>(10, true, DecodeKernel::Auto);
}

/// The tensor-core kernel against the oracle where the device has it (CUDA), sparse and
/// dense, at every head_dim it takes; elsewhere asking for it must be a typed error.
fn tensor_core_cases<F: TestFloat>(cases: usize) {
    // Elsewhere only the typed error is checked: two cases are enough (and keep CI short).
    let cases = if cfg!(feature = "cuda") { cases } else { 2 };
    run_cases::<F>("tensor-core attention", cases, |client, rng| {
        let sparse = rng.random_bool(0.7);
        let mut c = random_attention_case(rng, sparse);
        c.d = [16, 64, 128, 256][rng.random_range(0..4)];
        match attention_case::<F>(client, rng, &c, sparse, DecodeKernel::TensorCore) {
            Ok(err) if err < F::ATTENTION_TOL => Ok(()),
            Ok(err) => Err(format!(
                "rel err {err:e} (sparse {sparse}): {}",
                c.describe()
            )),
            Err(e)
                if !cfg!(feature = "cuda")
                    && e.contains("tensor-core decode kernel does not apply") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    });
}

#[test]
fn tensor_core_attention_matches_oracle_f16() {
    tensor_core_cases::<half::f16>(30);
}

#[test]
fn tensor_core_attention_matches_oracle_bf16() {
    tensor_core_cases::<half::bf16>(15);
}

/// Where `Auto` picks the tensor-core kernel (CUDA), the CUDA-core kernel is tested on its own
/// for 16-bit types too; elsewhere `Auto` is the CUDA-core kernel and the tests above cover it
/// (a few cases here check that asking for it explicitly works).
#[test]
fn simt_attention_matches_oracle_f16() {
    let (sparse, dense) = if cfg!(feature = "cuda") {
        (20, 10)
    } else {
        (2, 1)
    };
    attention_cases::<half::f16>(sparse, true, DecodeKernel::Simt);
    attention_cases::<half::f16>(dense, false, DecodeKernel::Simt);
}

/// The sliced kernel against the oracle, sparse and dense, explicitly chosen (`Auto` picks it
/// only off CUDA where planes are 32 units wide: on lavapipe this runs its shared-memory
/// exchanges, on GPUs its plane shuffles). Shapes it does not take (head_dim not a multiple
/// of 32) must be its typed error.
fn sliced_cases<F: TestFloat>(cases: usize) {
    run_cases::<F>("sliced attention", case_count(cases), |client, rng| {
        let sparse = rng.random_bool(0.6);
        let c = random_attention_case(rng, sparse);
        let applies = c.d.is_multiple_of(32);
        match attention_case::<F>(client, rng, &c, sparse, DecodeKernel::Sliced) {
            Ok(err) if applies && err < F::ATTENTION_TOL => Ok(()),
            Ok(err) => Err(format!(
                "rel err {err:e} (sparse {sparse}, applies {applies}): {}",
                c.describe()
            )),
            Err(e) if !applies && e.contains("sliced decode kernel does not apply") => Ok(()),
            Err(e) => Err(format!("{e}: {}", c.describe())),
        }
    });
}

#[test]
fn sliced_attention_matches_oracle_f32() {
    sliced_cases::<f32>(15);
}

#[test]
fn sliced_attention_matches_oracle_f16() {
    sliced_cases::<half::f16>(10);
}

#[test]
fn dense_attention_matches_oracle_f32() {
    attention_cases::<f32>(25, false, DecodeKernel::Auto);
}

#[test]
fn dense_attention_matches_oracle_f16() {
    attention_cases::<half::f16>(15, false, DecodeKernel::Auto);
}

/// One context-expansion case: random streams of ragged compressed and window lengths
/// (head_dims 8 to 256, every sparsity of the list), expanded into a context longer
/// than the longest sequence; each stream must be the oracle's decompressed segment, then
/// the window rows, then zeros. The output is poisoned with NaN, so a row left unwritten fails.
fn expand_case<F: TestFloat>(client: &ComputeClient<Rt>, rng: &mut StdRng) -> Result<(), String> {
    let sequences = rng.random_range(1..=3);
    let kv_heads = rng.random_range(1..=3);
    let d = [8, 16, 32, 64, 128, 256][rng.random_range(0..6)];
    let hd = HeadDim::new(d).map_err(|e| e.to_string())?;
    let s = [0.0, 0.3, 0.5, 0.7, 0.9][rng.random_range(0..5)];
    let sparsity = Sparsity::new(s).map_err(|e| e.to_string())?;
    let keep = keep_count(sparsity, hd);
    let compressed: Vec<u32> = (0..sequences).map(|_| rng.random_range(0..=70)).collect();
    let window: Vec<u32> = (0..sequences).map(|_| rng.random_range(0..=40)).collect();
    let capacity = layout::aligned_capacity(70);
    let window_capacity = 41;
    let context = (0..sequences)
        .map(|i| (compressed[i] + window[i]) as usize)
        .max()
        .unwrap_or(0)
        + rng.random_range(1..=9);
    let streams = sequences * kv_heads;
    let bitmap_stride = layout::bitmap_words(capacity, hd);
    let mut bits = vec![0u32; streams * bitmap_stride];
    let mut vals = vec![f64::NAN; streams * capacity * keep];
    let mut win = vec![f64::NAN; streams * window_capacity * d];
    let mut expect = vec![0.0; streams * context * d];
    for st in 0..streams {
        let (tc, tw) = (
            compressed[st / kv_heads] as usize,
            window[st / kv_heads] as usize,
        );
        let rows = DenseBlock::new(normals::<F>(rng, tc * d), tc, hd).map_err(|e| e.to_string())?;
        let seg = oracle::compress(&rows, sparsity);
        bits[st * bitmap_stride..][..seg.bitmap().len()].copy_from_slice(seg.bitmap());
        vals[st * capacity * keep..][..seg.values().len()].copy_from_slice(seg.values());
        let w = normals::<F>(rng, tw * d);
        win[st * window_capacity * d..][..tw * d].copy_from_slice(&w);
        let out = &mut expect[st * context * d..];
        out[..tc * d].copy_from_slice(seg.decompress().data());
        out[tc * d..(tc + tw) * d].copy_from_slice(&w);
    }
    let describe = format!(
        "{sequences} x {kv_heads} streams, head_dim {d}, s = {s}, compressed {compressed:?}, window {window:?}, context {context}"
    );
    let out = upload::<F>(client, &vec![f64::NAN; expect.len()]);
    let args = ExpandArgs {
        sequences,
        kv_heads,
        head_dim: hd,
        sparsity,
        capacity,
        window_capacity,
        compressed: &compressed,
        window: &window,
        context,
    };
    expand_context::<Rt, F>(
        client,
        &args,
        &client.create_from_slice(u32::as_bytes(&bits)),
        &upload::<F>(client, &vals),
        &upload::<F>(client, &win),
        &out,
    )
    .map_err(|e| format!("{e}: {describe}"))?;
    let got = read::<F>(client, out);
    // Every element is a copy: exact, and NaN (an unwritten element) never equals.
    match got.iter().zip(&expect).position(|(g, e)| g != e) {
        None => Ok(()),
        Some(i) => Err(format!(
            "element {i} (stream {}, row {}, channel {}): {} instead of {}: {describe}",
            i / (context * d),
            i / d % context,
            i % d,
            got[i],
            expect[i]
        )),
    }
}

/// The context expansion against the oracle's decompression, f32, f16 and bf16.
#[test]
fn expand_context_matches_oracle() {
    run_cases::<f32>("expand context", case_count(20), expand_case::<f32>);
    run_cases::<half::f16>("expand context", case_count(20), expand_case::<half::f16>);
    run_cases::<half::bf16>("expand context", case_count(20), expand_case::<half::bf16>);
}

/// One prompt-attention case: random prompts (token counts around the kernel's 16-row and
/// 64-key tiles), half of them a chunk after up to 200 earlier tokens (`past`, the streaming
/// prefill's case), GQA groups of 1 to 8, head_dims 16 to 128, against the oracle's causal
/// attention, the output poisoned with NaN. Where the kernel does not run (no CUDA matrix
/// units, as on lavapipe) the call must be the typed `Unsupported` error.
fn prompt_attention_case<F: TestFloat>(
    client: &ComputeClient<Rt>,
    rng: &mut StdRng,
) -> Result<(), String> {
    let batch = rng.random_range(1..=3);
    let tokens = match rng.random_range(0..4) {
        0 => rng.random_range(1..=17),
        1 => [63, 64, 65, 80, 127, 128, 129][rng.random_range(0..7)],
        _ => rng.random_range(1..=160),
    };
    let kv_heads = rng.random_range(1..=3);
    let group = [1, 2, 3, 4, 8][rng.random_range(0..5)];
    let d = [16, 32, 64, 128][rng.random_range(0..4)];
    let hd = HeadDim::new(d).map_err(|e| e.to_string())?;
    let past = if rng.random_bool(0.5) {
        0
    } else {
        rng.random_range(1..=200)
    };
    let shape = PromptShape::new(batch, tokens, kv_heads * group, kv_heads, hd)
        .and_then(|s| s.with_past(past))
        .map_err(|e| e.to_string())?;
    let describe = format!(
        "batch {batch}, {tokens} tokens after {past}, {kv_heads} KV heads x group {group}, head_dim {d}"
    );
    let q = normals::<F>(rng, batch * tokens * kv_heads * group * d);
    let k = normals::<F>(rng, batch * shape.context() * kv_heads * d);
    let v = normals::<F>(rng, batch * shape.context() * kv_heads * d);
    let out = upload::<F>(client, &vec![f64::NAN; q.len()]);
    let launched = prefill_attention::<Rt, F>(
        client,
        shape,
        &upload::<F>(client, &q),
        &upload::<F>(client, &k),
        &upload::<F>(client, &v),
        &out,
    );
    match launched {
        Ok(()) => {}
        Err(KernelError::Unsupported(_)) if !cfg!(feature = "cuda") => return Ok(()),
        Err(e) => return Err(format!("{e}: {describe}")),
    }
    let expect = oracle::causal_attention(shape, &q, &k, &v).map_err(|e| e.to_string())?;
    let err = rel_err(&read::<F>(client, out), &expect);
    if err < F::ATTENTION_TOL {
        Ok(())
    } else {
        Err(format!(
            "rel err {err:e} > {:e}: {describe}",
            F::ATTENTION_TOL
        ))
    }
}

/// The prompt-attention kernel against the oracle on CUDA (f16 and bf16); elsewhere a few
/// cases check that it refuses with the typed error, and f32 is refused everywhere.
#[test]
fn prompt_attention_matches_oracle() {
    let cases = if cfg!(feature = "cuda") { 40 } else { 2 };
    run_cases::<half::f16>(
        "prompt attention",
        cases,
        prompt_attention_case::<half::f16>,
    );
    run_cases::<half::bf16>(
        "prompt attention",
        cases / 2,
        prompt_attention_case::<half::bf16>,
    );
    let client = client();
    let hd = HeadDim::new(64).expect("valid");
    let shape = PromptShape::new(1, 4, 2, 1, hd).expect("valid");
    let h = client.create_from_slice(f32::as_bytes(&[0.0f32; 1024]));
    let err = prefill_attention::<Rt, f32>(&client, shape, &h, &h, &h, &h);
    assert!(
        matches!(err, Err(KernelError::Unsupported(_))),
        "f32: {err:?}"
    );
    let shape = PromptShape::new(1, 4, 2, 1, HeadDim::new(256).expect("valid")).expect("valid");
    if supports_type::<Rt, half::f16>(&client) {
        let err = prefill_attention::<Rt, half::f16>(&client, shape, &h, &h, &h, &h);
        assert!(
            matches!(err, Err(KernelError::Unsupported(_))),
            "head_dim 256: {err:?}"
        );
    }
}

/// The prompt attention kernel inside a model: where the backend has it (the bare
/// `CubeBackend` with f16 on CUDA), exact prefill through it gives the logits of the blocked
/// path (Burn's matmul and softmax in blocks of 64 queries) up to f16 rounding: a random
/// 2-layer model with head_dim 128 and two query heads per KV head, a ragged batch of prompts
/// longer than the kernel's tiles. Elsewhere the backend must say why it has no kernel (the
/// model tests cover the blocked path there).
///
/// It lives here, not in tests/model.rs, because Burn 0.21 fixes a device's float type for a
/// whole process at the first backend that touches it: beside the model tests' f32 backend
/// this f16 model would be f32 (or theirs f16), whichever ran first. No other test of this
/// binary goes through Burn.
#[test]
fn prompt_attention_in_a_model_matches_the_blocked_prefill() {
    use sparsekv::cache::burn::tensor::DType;
    use sparsekv::cache::burn_cubecl::CubeBackend;
    use sparsekv::cache::{DenseKvCache, KvCacheConfig, LayerCaches, SparseKvBackend};
    use sparsekv::format::ValueType;
    use sparsekv::llama::{Llama, LlamaConfig, RopeStyle};
    type H = CubeBackend<Rt, half::f16, i32, u32>;
    let device = Default::default();
    let config = LlamaConfig {
        dim: 512,
        hidden_dim: 1024,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        vocab_size: 256,
        max_seq: 512,
        rope_theta: 10000.0,
        rope_style: RopeStyle::RotateHalf,
        rope_scaling: None,
        rms_eps: 1e-5,
    };
    let lengths = [150usize, 97];
    let shape = PromptShape::new(
        lengths.len(),
        lengths[0],
        config.n_heads,
        config.n_kv_heads,
        HeadDim::new(config.head_dim()).expect("head_dim"),
    )
    .expect("shape");
    let unsupported = H::prompt_attention_unsupported(&device, ValueType::F16, shape);
    if !cfg!(feature = "cuda") {
        let why = unsupported.expect("no prompt attention kernel off CUDA");
        eprintln!("no prompt attention kernel here ({why}): nothing to compare");
        return;
    }
    assert_eq!(
        unsupported, None,
        "the kernel must run on CUDA for this shape"
    );
    let mut model = Llama::<H>::random(&config, &device).expect("model");
    let prompts: Vec<Vec<u32>> = lengths
        .iter()
        .enumerate()
        .map(|(s, &n)| (0..n).map(|i| ((i * 37 + s * 11) % 256) as u32).collect())
        .collect();
    let prompts: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
    let mut logits = |block: Option<usize>| {
        model.set_prefill_block(block);
        let cfg = KvCacheConfig::new(2, config.n_kv_heads, config.head_dim(), 256)
            .with_value_type(ValueType::F16);
        let mut caches = LayerCaches::<DenseKvCache<H>>::dense(config.n_layers, &cfg, &device)
            .expect("caches")
            .into_layers();
        let logits = model.prefill_batch(&prompts, &mut caches).expect("prefill");
        // f16 all the way (so the kernel, not the blocked path, ran for `None`).
        assert_eq!(logits.dtype(), DType::F16);
        logits
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("f32")
    };
    let fused = logits(None);
    let blocked = logits(Some(64));
    let scale = blocked.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let worst = fused
        .iter()
        .zip(&blocked)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        scale > 0.0 && fused.iter().all(|x| x.is_finite()) && worst <= 1e-2 * scale,
        "max difference {worst} (largest logit {scale})"
    );
}

/// A streaming prefill's chunks through a sparse cache, f16: after each chunk (the same width
/// for every sequence) its queries attend through the cache (`attend_newest`), on CUDA by the
/// prompt attention kernel over the cache's tokens expanded back to dense rows, elsewhere
/// through the decode kernel. Either way each query row must equal the oracle's causal
/// attention over the tokens up to its own as cached: the compressed ones pruned (the
/// oracle's compress and decompress), the window's dense. In this binary for the reason given
/// at `prompt_attention_in_a_model_matches_the_blocked_prefill`.
#[test]
fn streaming_chunks_through_a_sparse_cache_match_the_oracle() {
    use sparsekv::cache::burn::tensor::{Tensor, TensorData};
    use sparsekv::cache::burn_cubecl::CubeBackend;
    use sparsekv::cache::{KvCache, KvCacheConfig, SparseKvCache};
    use sparsekv::format::ValueType;
    type F = half::f16;
    type H = CubeBackend<Rt, F, i32, u32>;
    if !supports_type::<Rt, F>(&client()) {
        eprintln!("f16 not supported by this device: nothing to run");
        return;
    }
    let device = Default::default();
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    for scenario in 0..case_count(8) {
        let b = rng.random_range(1..=2);
        let kv_heads = rng.random_range(1..=2);
        let group = [1, 2, 4][rng.random_range(0..3)];
        let q_heads = kv_heads * group;
        let d = [16, 64, 128][rng.random_range(0..3)];
        let hd = HeadDim::new(d).unwrap();
        let window = [4, 32][rng.random_range(0..2)];
        let (ks, vs) = (
            [0.0, 0.5, 0.7][rng.random_range(0..3)],
            [0.0, 0.5, 0.7][rng.random_range(0..3)],
        );
        let widths: Vec<usize> = (0..rng.random_range(1..=3))
            .map(|_| rng.random_range(2..=80))
            .collect();
        let describe = format!(
            "scenario {scenario}: batch {b}, {kv_heads} KV heads x group {group}, head_dim {d}, window {window}, s = {ks}/{vs}, chunks {widths:?}, SPARSEKV_SEED={seed}"
        );
        let config = KvCacheConfig::new(b, kv_heads, d, widths.iter().sum::<usize>() + 1)
            .with_window(window)
            .with_sparsity(ks, vs)
            .with_value_type(ValueType::F16);
        let mut cache = SparseKvCache::<H>::new(&config, &device).expect(&describe);
        // The appended rows per stream, as the cache received them.
        let mut history = vec![(Vec::<f64>::new(), Vec::<f64>::new()); b * kv_heads];
        for &n in &widths {
            let k = normals::<F>(&mut rng, b * kv_heads * n * d);
            let v = normals::<F>(&mut rng, b * kv_heads * n * d);
            for (st, (hk, hv)) in history.iter_mut().enumerate() {
                hk.extend_from_slice(&k[st * n * d..][..n * d]);
                hv.extend_from_slice(&v[st * n * d..][..n * d]);
            }
            let tensor = |x: &[f64], dims: [usize; 4]| {
                let x: Vec<F> = x.iter().map(|&x| F::from_f64(x)).collect();
                Tensor::<H, 4>::from_data(TensorData::new(x, dims), &device)
            };
            let counts = vec![n; b];
            cache
                .append_ragged(
                    tensor(&k, [b, kv_heads, n, d]),
                    tensor(&v, [b, kv_heads, n, d]),
                    &counts,
                )
                .expect(&describe);
            let q = normals::<F>(&mut rng, b * n * q_heads * d);
            let got = tensor_f64(
                cache
                    .attend_newest(tensor(&q, [b, n, q_heads, d]), &counts)
                    .expect(&describe),
            );
            // Every stream's tokens as cached: the compressed ones pruned, the window's dense.
            let context = history[0].0.len() / d;
            let comp = cache.compressed_lengths().to_vec();
            let cached = |rows: &[f64], tc: usize, s: f64| -> Vec<f64> {
                let old = DenseBlock::new(rows[..tc * d].to_vec(), tc, hd).unwrap();
                let mut out = oracle::compress(&old, Sparsity::new(s).unwrap())
                    .decompress()
                    .data()
                    .to_vec();
                out.extend_from_slice(&rows[tc * d..]);
                out
            };
            let (mut kc, mut vc) = (Vec::new(), Vec::new());
            for (st, (hk, hv)) in history.iter().enumerate() {
                kc.extend(cached(hk, comp[st / kv_heads], ks));
                vc.extend(cached(hv, comp[st / kv_heads], vs));
            }
            let shape = PromptShape::new(b, n, q_heads, kv_heads, hd)
                .and_then(|s| s.with_past(context - n))
                .unwrap();
            let expect = oracle::causal_attention(shape, &q, &kc, &vc).unwrap();
            let err = rel_err(&got, &expect);
            assert!(
                err < F::ATTENTION_TOL,
                "chunk of {n} at {context} tokens ({comp:?} compressed): rel err {err:e}: {describe}"
            );
        }
    }
}

/// The prompt matmul (`x · wᵀ + residual` for many rows: cubek's TMA kernel on Hopper, Burn's
/// matmul elsewhere) against f64 on the CPU, f16, at shapes off the kernels' tiles. In this
/// binary for the reason given at `prompt_attention_in_a_model_matches_the_blocked_prefill`.
#[test]
fn prompt_matmul_matches_reference() {
    use sparsekv::cache::SparseKvBackend;
    use sparsekv::cache::burn::tensor::{Tensor, TensorData, TensorPrimitive};
    use sparsekv::cache::burn_cubecl::CubeBackend;
    type H = CubeBackend<Rt, half::f16, i32, u32>;
    if !supports_type::<Rt, half::f16>(&client()) {
        eprintln!("prompt matmul: f16 not supported by this device");
        return;
    }
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let device = Default::default();
    for (m, n, k, with_residual) in [
        (300, 192, 256, true),
        (1000, 384, 512, false),
        (65, 64, 128, true),
    ] {
        let x = normals::<half::f16>(&mut rng, m * k);
        let w = normals::<half::f16>(&mut rng, n * k);
        let r = normals::<half::f16>(&mut rng, m * n);
        let tensor = |v: &[f64], dims: [usize; 2]| {
            let data: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f64(x)).collect();
            Tensor::<H, 2>::from_data(TensorData::new(data, dims), &device)
                .into_primitive()
                .tensor()
        };
        let out = H::prompt_matmul(
            tensor(&x, [m, k]),
            tensor(&w, [n, k]),
            with_residual.then(|| tensor(&r, [m, n])),
        )
        .expect("prompt matmul");
        let got = tensor_f64(Tensor::<H, 2>::from_primitive(TensorPrimitive::Float(out)));
        let expect: Vec<f64> = (0..m * n)
            .map(|i| {
                let (row, col) = (i / n, i % n);
                let dot: f64 = (0..k).map(|j| x[row * k + j] * w[col * k + j]).sum();
                dot + if with_residual { r[i] } else { 0.0 }
            })
            .collect();
        let err = rel_err(&got, &expect);
        assert!(
            err < 2e-3,
            "[{m}, {k}] x [{n}, {k}]ᵀ (residual {with_residual}), SPARSEKV_SEED={seed}: rel err {err:e}"
        );
    }
}

/// Whether `got` is within `bound` of `reference`; never for NaN (an unwritten, poisoned
/// output).
fn within(got: f64, reference: f64, bound: f64) -> bool {
    (got - reference).abs() <= bound
}

/// One random skinny matmul (`m` up to 20, so chunks of activation rows and partial chunks
/// occur; `k` not always a multiple of the vector width; `n` not always a multiple of a cube's
/// rows; random or automatic tuning; plain activations, an RMSNorm prologue over rows of
/// random scales, zero rows among them, or a SwiGLU prologue) against an f64 reference,
/// element by element: each output within `tol` of `Σ |a w|` of its reference, `a` the
/// activations after the prologue. `forced`: the case asks for that matrix-unit kernel
/// with explicit tuning and a shape it takes where it runs (CUDA, 16-bit types; elsewhere the
/// typed error is checked), so that those kernels are covered every run.
fn skinny_case<F: TestFloat>(
    client: &ComputeClient<Rt>,
    rng: &mut StdRng,
    tol: f64,
    forced: Option<SkinnyKernel>,
) -> Result<(), String> {
    let m = [1, 2, 3, 4, 5, 8, 9, 16, 20, 40, 64][rng.random_range(0..11)];
    let (n, k): (usize, usize) = match forced {
        Some(_) => (
            rng.random_range(32..=300),
            [32, 64, 96, 352, 4096][rng.random_range(0..5)],
        ),
        None => (
            rng.random_range(1..=300),
            [1, 3, 8, 12, 64, 96, 136, 208, 352, 1000, 4096][rng.random_range(0..11)],
        ),
    };
    let kernel = forced.unwrap_or(
        [
            SkinnyKernel::Auto,
            SkinnyKernel::Simt,
            SkinnyKernel::TensorCore,
            SkinnyKernel::Fragments,
        ][rng.random_range(0..4)],
    );
    let tuning = if forced.is_some() || rng.random_bool(0.5) {
        let unrolls: &[usize] = if kernel == SkinnyKernel::Fragments {
            &[1, 2, 4, 8]
        } else {
            &[1, 2, 4]
        };
        Some(SkinnyTuning {
            kernel,
            rows_per_plane: [1, 2, 4, 8][rng.random_range(0..4)],
            // The fragment kernel also with the large cubes that turn its prefetch off.
            planes: if kernel == SkinnyKernel::Fragments && rng.random_bool(0.3) {
                [16, 32][rng.random_range(0..2)]
            } else {
                rng.random_range(1..=8)
            },
            unroll: unrolls[rng.random_range(0..unrolls.len())],
        })
    } else {
        None
    };
    // Where a matrix-unit kernel cannot run, asking for it must be a typed error.
    let matrix_units = cfg!(feature = "cuda") && F::name() != "f32";
    let tensor_cores_fit = matrix_units && m >= 8 && n >= 32 && k.is_multiple_of(16);
    let fragments_fit = matrix_units && n >= 16 && k.is_multiple_of(32);
    let prologue = rng.random_range(0..3);
    let x: Vec<f64> = match prologue {
        // RMSNorm: rows of different scales, some all zero.
        1 => (0..m)
            .flat_map(|_| {
                let scale = [0.0, 1e-3, 1.0, 50.0][rng.random_range(0..4)];
                normals::<F>(rng, k)
                    .into_iter()
                    .map(move |v| TestFloat::to_f64(F::from_f64(v * scale)))
            })
            .collect(),
        // SwiGLU: rows of the gate then the up projection, gates up to about ±12.
        2 => normals::<F>(rng, m * 2 * k)
            .into_iter()
            .map(|v| TestFloat::to_f64(F::from_f64(v * 4.0)))
            .collect(),
        _ => normals::<F>(rng, m * k),
    };
    let norm_w = normals::<F>(rng, k);
    let eps = [0.0, 1e-5][rng.random_range(0..2)];
    // The activations the product uses, row-major `[m, k]`.
    let a: Vec<f64> = (0..m)
        .flat_map(|i| {
            let (x, norm_w) = (&x, &norm_w);
            let row = match prologue {
                1 => {
                    let xr = &x[i * k..(i + 1) * k];
                    let ms = xr.iter().map(|v| v * v).sum::<f64>() / k as f64;
                    let factor = if ms + eps > 0.0 {
                        1.0 / (ms + eps).sqrt()
                    } else {
                        0.0
                    };
                    xr.iter()
                        .zip(norm_w)
                        .map(|(v, g)| v * factor * g)
                        .collect::<Vec<_>>()
                }
                2 => (0..k)
                    .map(|c| {
                        let (g, u) = (x[i * 2 * k + c], x[i * 2 * k + k + c]);
                        g / (1.0 + (-g).exp()) * u
                    })
                    .collect(),
                _ => x[i * k..(i + 1) * k].to_vec(),
            };
            row.into_iter()
        })
        .collect();
    let w = normals::<F>(rng, n * k);
    let (x_h, w_h) = (upload::<F>(client, &x), upload::<F>(client, &w));
    let norm_h = upload::<F>(client, &norm_w);
    let input = match prologue {
        1 => SkinnyInput::RmsNorm {
            weight: &norm_h,
            eps: eps as f32,
        },
        2 => SkinnyInput::SwiGlu,
        _ => SkinnyInput::Plain,
    };
    // Half the cases add a residual to the product.
    let residual = rng.random_bool(0.5).then(|| normals::<F>(rng, m * n));
    let residual_h = residual.as_ref().map(|r| upload::<F>(client, r));
    let out_h = upload::<F>(client, &vec![f64::NAN; m * n]);
    let launched = skinny_matmul_with::<Rt, F>(
        client,
        SkinnyShape { m, n, k },
        input,
        &x_h,
        &w_h,
        residual_h.as_ref(),
        &out_h,
        tuning,
    );
    match launched {
        Err(KernelError::InvalidArguments(e))
            if tuning.is_some_and(|t| t.kernel == SkinnyKernel::TensorCore)
                && !tensor_cores_fit
                && e.contains("tensor-core skinny matmul needs") =>
        {
            return Ok(());
        }
        Err(KernelError::InvalidArguments(e))
            if tuning.is_some_and(|t| t.kernel == SkinnyKernel::Fragments)
                && !fragments_fit
                && e.contains("fragment skinny matmul needs") =>
        {
            return Ok(());
        }
        // The norm's reduction tree needs a power of two planes without plane operations.
        Err(KernelError::InvalidArguments(e))
            if prologue == 1 && e.contains("needs a power of two planes") =>
        {
            return Ok(());
        }
        other => other.map_err(|e| format!("m {m} n {n} k {k} {tuning:?} {input:?}: {e}"))?,
    }
    let out = read::<F>(client, out_h);
    for i in 0..m {
        for j in 0..n {
            let (ar, wr) = (&a[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
            let add = residual.as_ref().map_or(0.0, |r| r[i * n + j]);
            let reference: f64 = add + ar.iter().zip(wr).map(|(a, b)| a * b).sum::<f64>();
            let scale: f64 = add.abs() + ar.iter().zip(wr).map(|(a, b)| (a * b).abs()).sum::<f64>();
            let got = out[i * n + j];
            // NaN (an unwritten, poisoned output) fails the comparison. The output's own
            // rounding to F adds up to half a subnormal step (tiny f16 products).
            if !within(got, reference, tol * scale + F::SUBNORMAL_STEP / 2.0) {
                return Err(format!(
                    "m {m} n {n} k {k} {tuning:?} {input:?}: out[{i}, {j}] = {got}, reference {reference}"
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn skinny_matmul_matches_reference() {
    run_cases::<f32>("skinny matmul", case_count(20), |c, r| {
        skinny_case::<f32>(c, r, 1e-5, None)
    });
    run_cases::<half::f16>("skinny matmul", case_count(20), |c, r| {
        skinny_case::<half::f16>(c, r, 2e-3, None)
    });
    run_cases::<half::bf16>("skinny matmul", case_count(10), |c, r| {
        skinny_case::<half::bf16>(c, r, 1e-2, None)
    });
    for kernel in [SkinnyKernel::TensorCore, SkinnyKernel::Fragments] {
        run_cases::<half::f16>("skinny matmul on matrix units", case_count(8), |c, r| {
            skinny_case::<half::f16>(c, r, 2e-3, Some(kernel))
        });
        run_cases::<half::bf16>("skinny matmul on matrix units", case_count(4), |c, r| {
            skinny_case::<half::bf16>(c, r, 1e-2, Some(kernel))
        });
    }
}

/// One random RMSNorm (rows of random lengths, some all zero, some scaled far past where x²
/// overflows 16-bit types, some tiny) against an f64 reference, element by element.
fn rms_norm_case<F: TestFloat>(
    client: &ComputeClient<Rt>,
    rng: &mut StdRng,
    tol: f64,
    huge: f64,
) -> Result<(), String> {
    let rows = rng.random_range(1..=12usize);
    let dim = [1, 3, 8, 64, 100, 4096][rng.random_range(0..6)];
    let eps = [0.0, 1e-6, 1e-5][rng.random_range(0..3)];
    let mut x = Vec::with_capacity(rows * dim);
    for _ in 0..rows {
        let scale = [0.0, 1e-3, 1.0, huge][rng.random_range(0..4)];
        x.extend(
            normals::<F>(rng, dim)
                .into_iter()
                .map(|v| TestFloat::to_f64(F::from_f64(v * scale))),
        );
    }
    let w = normals::<F>(rng, dim);
    let (x_h, w_h) = (upload::<F>(client, &x), upload::<F>(client, &w));
    let out_h = upload::<F>(client, &vec![f64::NAN; rows * dim]);
    rms_norm::<Rt, F>(client, rows, dim, eps as f32, &x_h, &w_h, &out_h)
        .map_err(|e| e.to_string())?;
    let out = read::<F>(client, out_h);
    for r in 0..rows {
        let xr = &x[r * dim..(r + 1) * dim];
        let ms = xr.iter().map(|v| v * v).sum::<f64>() / dim as f64;
        let factor = if ms + eps > 0.0 {
            1.0 / (ms + eps).sqrt()
        } else {
            0.0
        };
        for c in 0..dim {
            let reference = xr[c] * factor * w[c];
            let got = out[r * dim + c];
            // Relative to the row's scale (|w| up to a few): NaN and unwritten outputs fail.
            if !within(got, reference, tol * (1.0 + reference.abs())) {
                return Err(format!(
                    "rows {rows} dim {dim} eps {eps}: out[{r}, {c}] = {got}, reference {reference}"
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn rms_norm_matches_reference() {
    run_cases::<f32>("RMSNorm", case_count(20), |c, r| {
        rms_norm_case::<f32>(c, r, 1e-5, 1e20)
    });
    run_cases::<half::f16>("RMSNorm", case_count(20), |c, r| {
        rms_norm_case::<half::f16>(c, r, 2e-3, 3e3)
    });
    run_cases::<half::bf16>("RMSNorm", case_count(10), |c, r| {
        rms_norm_case::<half::bf16>(c, r, 1e-2, 1e30)
    });
}

/// One random RoPE split (random heads, head_dim, style, tokens per sequence and start
/// positions in the angle tables) against an f64 reference: queries `[b, n, hq, d]`, every
/// element within `tol` of `1 +` its magnitude; keys and values either `[b, hkv, n, d]`
/// (every token) or, in half the cases, a random range of each sequence's tokens written at a
/// random row of streams of a larger capacity (a cache's window), every other row left as
/// it was (poisoned).
fn rope_case<F: TestFloat>(
    client: &ComputeClient<Rt>,
    rng: &mut StdRng,
    tol: f64,
) -> Result<(), String> {
    let (b, n) = (rng.random_range(1..=4usize), rng.random_range(1..=5usize));
    let kv_heads = rng.random_range(1..=3usize);
    let q_heads = kv_heads * [1, 2, 4][rng.random_range(0..3)];
    let d = [2, 8, 64, 128][rng.random_range(0..4)];
    let style = [RopeStyle::Interleaved, RopeStyle::RotateHalf][rng.random_range(0..2)];
    let positions = rng.random_range(n..=n + 40);
    let starts: Vec<u32> = (0..b)
        .map(|_| rng.random_range(0..=positions - n) as u32)
        .collect();
    let half = d / 2;
    let angles: Vec<f64> = (0..positions * half)
        .map(|i| (i / half) as f64 * 10f64.powf(-((i % half) as f64) / half as f64))
        .collect();
    let cos: Vec<f64> = angles.iter().map(|a| a.cos()).collect();
    let sin: Vec<f64> = angles.iter().map(|a| a.sin()).collect();
    let heads = q_heads + 2 * kv_heads;
    let qkv = normals::<F>(rng, b * n * heads * d);
    let (qkv_h, cos_h, sin_h) = (
        upload::<F>(client, &qkv),
        upload::<F>(client, &cos),
        upload::<F>(client, &sin),
    );
    // As the kernel sees the tables: rounded to F.
    let (cos, sin) = (
        read::<F>(client, cos_h.clone()),
        read::<F>(client, sin_h.clone()),
    );
    // Where each sequence's keys and values go: every token in place, or tokens
    // `src[s] .. src[s] + count[s]` at row `dst[s]` of `capacity` rows.
    let whole = rng.random_bool(0.5);
    let capacity = if whole {
        n
    } else {
        rng.random_range(n..=n + 6)
    };
    let (mut src, mut dst, mut count) = (vec![0u32; b], vec![0u32; b], vec![n as u32; b]);
    if !whole {
        for s in 0..b {
            src[s] = rng.random_range(0..=n) as u32;
            count[s] = rng.random_range(0..=n - src[s] as usize) as u32;
            dst[s] = rng.random_range(0..=capacity - count[s] as usize) as u32;
        }
    }
    let kv_rows = CopyRowsArgs {
        sequences: b,
        kv_heads,
        head_dim: d,
        src_capacity: n,
        dst_capacity: capacity,
        src_start: &src,
        dst_start: &dst,
        counts: &count,
    };
    let poisoned = |len| upload::<F>(client, &vec![f64::NAN; len]);
    let (q_h, k_h, v_h) = (
        poisoned(b * n * q_heads * d),
        poisoned(b * kv_heads * capacity * d),
        poisoned(b * kv_heads * capacity * d),
    );
    let shape = RopeShape {
        sequences: b,
        tokens: n,
        q_heads,
        kv_heads,
        head_dim: d,
        positions,
    };
    rope_split::<Rt, F>(
        client,
        shape,
        style,
        &qkv_h,
        &cos_h,
        &sin_h,
        &starts,
        &q_h,
        [&k_h, &v_h],
        &kv_rows,
    )
    .map_err(|e| e.to_string())?;
    let (q, mut k, mut v) = (
        read::<F>(client, q_h),
        read::<F>(client, k_h),
        read::<F>(client, v_h),
    );
    let case = format!(
        "b {b} n {n} heads {q_heads}/{kv_heads} d {d} {style:?} starts {starts:?}, K/V tokens {src:?} x {count:?} at rows {dst:?} of {capacity}"
    );
    for s in 0..b {
        for t in 0..n {
            let row = s * n + t;
            let pos = starts[s] as usize + t;
            // The K/V row this token writes, if it writes one.
            let kv_row = (t >= src[s] as usize && t < (src[s] + count[s]) as usize)
                .then(|| dst[s] as usize + t - src[s] as usize);
            for head in 0..heads {
                for i in 0..half {
                    let (c0, c1) = match style {
                        RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                        RopeStyle::RotateHalf => (i, i + half),
                    };
                    let at = (row * heads + head) * d;
                    let (x0, x1) = (qkv[at + c0], qkv[at + c1]);
                    let (cs, sn) = (cos[pos * half + i], sin[pos * half + i]);
                    let rotated = (x0 * cs - x1 * sn, x0 * sn + x1 * cs);
                    let (want, got) = if head < q_heads {
                        let o = (row * q_heads + head) * d;
                        (rotated, (q[o + c0], q[o + c1]))
                    } else {
                        let Some(r) = kv_row else { continue };
                        let (rows, kv_head, want) = if head < q_heads + kv_heads {
                            (&mut k, head - q_heads, rotated)
                        } else {
                            (&mut v, head - q_heads - kv_heads, (x0, x1))
                        };
                        let o = ((s * kv_heads + kv_head) * capacity + r) * d;
                        let got = (rows[o + c0], rows[o + c1]);
                        // Checked: the poison check below must find only unwritten rows.
                        (rows[o + c0], rows[o + c1]) = (f64::NAN, f64::NAN);
                        (want, got)
                    };
                    for (g, w) in [(got.0, want.0), (got.1, want.1)] {
                        if !within(g, w, tol * (1.0 + w.abs())) {
                            return Err(format!(
                                "{case}: sequence {s} token {t} head {head} pair {i}: {g}, reference {w}"
                            ));
                        }
                    }
                }
            }
        }
    }
    if let Some(i) = k.iter().chain(&v).position(|x| !x.is_nan()) {
        return Err(format!(
            "{case}: K/V element {i} (of both buffers) was written where no token goes"
        ));
    }
    Ok(())
}

#[test]
fn rope_split_matches_reference() {
    run_cases::<f32>("RoPE", case_count(20), |c, r| rope_case::<f32>(c, r, 1e-5));
    run_cases::<half::f16>("RoPE", case_count(20), |c, r| {
        rope_case::<half::f16>(c, r, 2e-3)
    });
    run_cases::<half::bf16>("RoPE", case_count(10), |c, r| {
        rope_case::<half::bf16>(c, r, 1e-2)
    });
}

/// One random SwiGLU (gates up to ±40, where exp overflows 16-bit types) against an f64
/// reference, element by element.
fn swiglu_case<F: TestFloat>(
    client: &ComputeClient<Rt>,
    rng: &mut StdRng,
    tol: f64,
) -> Result<(), String> {
    let rows = rng.random_range(1..=9usize);
    let hidden = [1, 3, 8, 100, 1024][rng.random_range(0..5)];
    let x: Vec<f64> = normals::<F>(rng, rows * 2 * hidden)
        .into_iter()
        .map(|v| TestFloat::to_f64(F::from_f64(v * 10.0)))
        .collect();
    let x_h = upload::<F>(client, &x);
    let out_h = upload::<F>(client, &vec![f64::NAN; rows * hidden]);
    swiglu::<Rt, F>(client, rows, hidden, &x_h, &out_h).map_err(|e| e.to_string())?;
    let out = read::<F>(client, out_h);
    for r in 0..rows {
        for c in 0..hidden {
            let (g, u) = (x[r * 2 * hidden + c], x[r * 2 * hidden + hidden + c]);
            let reference = g / (1.0 + (-g).exp()) * u;
            let got = out[r * hidden + c];
            if !within(got, reference, tol * (1.0 + reference.abs())) {
                return Err(format!(
                    "rows {rows} hidden {hidden}: out[{r}, {c}] = {got}, reference {reference}"
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn swiglu_matches_reference() {
    run_cases::<f32>("SwiGLU", case_count(10), |c, r| {
        swiglu_case::<f32>(c, r, 1e-5)
    });
    run_cases::<half::f16>("SwiGLU", case_count(10), |c, r| {
        swiglu_case::<half::f16>(c, r, 2e-3)
    });
}

#[test]
fn unsupported_types_and_bad_arguments_are_typed_errors() {
    let client = client();
    let hd = HeadDim::new(16).expect("valid");
    let h = client.create_from_slice(f32::as_bytes(&[0.0f32; 64]));
    let args = AttentionArgs {
        batch: 1,
        q_heads: 3,
        kv_heads: 2,
        head_dim: hd,
        compressed_lens: &[0],
        window_lens: &[1],
        row_sequences: None,
    };
    let window = DenseCacheArgs {
        k: &h,
        v: &h,
        stride: 16,
    };
    let err = decode_attention::<Rt, f32>(&client, &args, &h, None, &window, &h);
    assert!(
        matches!(err, Err(KernelError::InvalidArguments(_))),
        "{err:?}"
    );
    let args = AttentionArgs {
        q_heads: 2,
        kv_heads: 1,
        window_lens: &[0],
        ..args
    };
    let err = decode_attention::<Rt, f32>(&client, &args, &h, None, &window, &h);
    assert!(
        matches!(err, Err(KernelError::InvalidArguments(_))),
        "no tokens: {err:?}"
    );
    let args = AttentionArgs {
        window_lens: &[5],
        ..args
    };
    let err = decode_attention::<Rt, f32>(&client, &args, &h, None, &window, &h);
    assert!(
        matches!(err, Err(KernelError::InvalidArguments(_))),
        "over capacity: {err:?}"
    );
    if supports_type::<Rt, half::f16>(&client) {
        // 16-bit values are read as 32-bit words: an odd value stride is refused, not misread.
        let args = AttentionArgs {
            window_lens: &[1],
            compressed_lens: &[1],
            ..args
        };
        let segment = SparseSegmentArgs {
            k_bitmap: &h,
            k_values: &h,
            v_bitmap: &h,
            v_values: &h,
            bitmap_stride: 1,
            k_values_stride: 5,
            v_values_stride: 6,
            k_sparsity: Sparsity::new(0.7).expect("valid"),
            v_sparsity: Sparsity::new(0.7).expect("valid"),
        };
        let err =
            decode_attention::<Rt, half::f16>(&client, &args, &h, Some(&segment), &window, &h);
        assert!(
            matches!(&err, Err(KernelError::InvalidArguments(m)) if m.contains("value strides")),
            "{err:?}"
        );
    }
    for (shape, what) in [
        (SkinnyShape { m: 0, n: 4, k: 4 }, "no rows"),
        (SkinnyShape { m: 65, n: 4, k: 4 }, "too many rows"),
        (
            SkinnyShape {
                m: 4,
                n: 4,
                k: 4096,
            },
            "operands far larger than the buffer",
        ),
    ] {
        let err = skinny_matmul_with::<Rt, f32>(
            &client,
            shape,
            SkinnyInput::Plain,
            &h,
            &h,
            None,
            &h,
            None,
        );
        assert!(
            matches!(err, Err(KernelError::InvalidArguments(_))),
            "{what}: {err:?}"
        );
    }
    if !supports_type::<Rt, half::bf16>(&client) {
        let args = AttentionArgs {
            window_lens: &[1],
            ..args
        };
        let err = decode_attention::<Rt, half::bf16>(&client, &args, &h, None, &window, &h);
        assert!(
            matches!(err, Err(KernelError::UnsupportedType { .. })),
            "{err:?}"
        );
    }
}
