//! Putting the sparse cache into a Burn model: an attention layer written the usual Burn way
//! (as tracel-ai/models' llama-burn: a preallocated K/V tensor per layer written with
//! `slice_assign`, attention as matmul, softmax, matmul) and the same layer on
//! `SparseKvCache`, on Burn's own backend type (`burn::backend::Wgpu`, or `Cuda` with
//! `--features cuda`; fused, as Burn's default features make them).
//!
//! The whole change to the layer's decode step (see `step_usual` and `step_sparse` below):
//!
//! ```text
//! -impl<B: Backend> Attention<B> {
//! -fn step_usual(&self, x: Tensor<B, 2>, cache: &mut BurnKvCache<B>) -> Tensor<B, 2> {
//! +impl<B: SparseKvBackend> Attention<B> {
//! +fn step_sparse(&self, x: Tensor<B, 2>, cache: &mut SparseKvCache<B>)
//! +    -> Result<Tensor<B, 2>, KvCacheError> {
//!      let (q, k, v) = self.project(x);
//! -    let (k, v) = cache.append(k, v);
//! -    let out = attention(q, k, v, self.n_rep);
//! +    cache.append(k, v)?;
//! +    let out = cache.attend(q)?;
//! -    self.output(out)
//! +    Ok(self.output(out))
//!  }
//! ```
//!
//! plus the cache's creation (`SparseKvCache::new(&KvCacheConfig::new(batch, kv_heads,
//! head_dim, max_seq).with_sparsity(0.7, 0.7), &device)?` instead of two zero tensors).
//!
//! The program runs both layers over the same random tokens, one token per step. At sparsity
//! 0 the sparse cache computes what the usual layer does (the program fails if it does not);
//! at 0.7 it prints how far the outputs move and how much memory the cache holds.
//!
//!     cargo run --release --example burn_attention

use std::process::ExitCode;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use sparsekv::cache::burn;
use sparsekv::cache::{KvCache, KvCacheConfig, KvCacheError, SparseKvBackend, SparseKvCache};

/// Burn's own backend type, as Burn's default features make it (fused).
#[cfg(feature = "cuda")]
type B = burn::backend::Cuda<f32, i32>;
#[cfg(not(feature = "cuda"))]
type B = burn::backend::Wgpu<f32, i32, u32>;

const BATCH: usize = 2;
const DIM: usize = 256;
const HEADS: usize = 8;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = DIM / HEADS;
const TOKENS: usize = 160;

/// The usual Burn KV cache (llama-burn's): K and V preallocated as
/// `[batch, kv_heads, max_seq, head_dim]`, new rows written with `slice_assign`.
struct BurnKvCache<B: Backend> {
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    len: usize,
}

impl<B: Backend> BurnKvCache<B> {
    fn new(max_seq: usize, device: &B::Device) -> Self {
        let zeros = || Tensor::zeros([BATCH, KV_HEADS, max_seq, HEAD_DIM], device);
        BurnKvCache {
            k: zeros(),
            v: zeros(),
            len: 0,
        }
    }

    /// Writes `n` new rows (`[batch, kv_heads, n, head_dim]`) and returns every cached key and
    /// value.
    fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, h, n, d] = k.dims();
        let (from, to) = (self.len, self.len + n);
        self.k = self.k.clone().slice_assign([0..b, 0..h, from..to, 0..d], k);
        self.v = self.v.clone().slice_assign([0..b, 0..h, from..to, 0..d], v);
        self.len = to;
        (
            self.k.clone().slice([0..b, 0..h, 0..to, 0..d]),
            self.v.clone().slice([0..b, 0..h, 0..to, 0..d]),
        )
    }
}

/// Decode attention the usual way: the grouped K/V heads repeated for their query heads, then
/// matmul, softmax, matmul. `q` `[batch, heads, head_dim]`, `k` and `v`
/// `[batch, kv_heads, t, head_dim]`; returns `[batch, heads, head_dim]`.
fn attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    n_rep: usize,
) -> Tensor<B, 3> {
    let [b, kv_heads, t, d] = k.dims();
    let repeat = |x: Tensor<B, 4>| {
        x.unsqueeze_dim::<5>(2)
            .expand([b, kv_heads, n_rep, t, d])
            .reshape([b, kv_heads * n_rep, t, d])
    };
    let (k, v) = (repeat(k), repeat(v));
    let scores = q.unsqueeze_dim::<4>(2).matmul(k.swap_dims(2, 3)) / (d as f64).sqrt();
    softmax(scores, 3).matmul(v).squeeze_dim::<3>(2)
}

/// An attention layer: projections of a model dimension `DIM` into `HEADS` query heads and
/// `KV_HEADS` key/value heads of `HEAD_DIM`.
#[derive(Module, Debug)]
struct Attention<B: Backend> {
    wq: Linear<B>,
    wk: Linear<B>,
    wv: Linear<B>,
    wo: Linear<B>,
    n_rep: usize,
}

impl<B: Backend> Attention<B> {
    fn new(device: &B::Device) -> Self {
        let linear = |out| LinearConfig::new(DIM, out).with_bias(false).init(device);
        Attention {
            wq: linear(HEADS * HEAD_DIM),
            wk: linear(KV_HEADS * HEAD_DIM),
            wv: linear(KV_HEADS * HEAD_DIM),
            wo: linear(DIM),
            n_rep: HEADS / KV_HEADS,
        }
    }

    /// One token per sequence, `x` `[batch, dim]`: the query `[batch, heads, head_dim]` and the
    /// new key and value rows `[batch, kv_heads, 1, head_dim]` (RoPE would go here).
    fn project(&self, x: Tensor<B, 2>) -> (Tensor<B, 3>, Tensor<B, 4>, Tensor<B, 4>) {
        let q = self.wq.forward(x.clone()).reshape([BATCH, HEADS, HEAD_DIM]);
        let k = self
            .wk
            .forward(x.clone())
            .reshape([BATCH, KV_HEADS, 1, HEAD_DIM]);
        let v = self.wv.forward(x).reshape([BATCH, KV_HEADS, 1, HEAD_DIM]);
        (q, k, v)
    }

    fn output(&self, out: Tensor<B, 3>) -> Tensor<B, 2> {
        self.wo.forward(out.reshape([BATCH, HEADS * HEAD_DIM]))
    }

    /// The decode step written the usual Burn way.
    fn step_usual(&self, x: Tensor<B, 2>, cache: &mut BurnKvCache<B>) -> Tensor<B, 2> {
        let (q, k, v) = self.project(x);
        let (k, v) = cache.append(k, v);
        let out = attention(q, k, v, self.n_rep);
        self.output(out)
    }
}

impl<B: SparseKvBackend> Attention<B> {
    /// The same step on the sparse cache.
    fn step_sparse(
        &self,
        x: Tensor<B, 2>,
        cache: &mut SparseKvCache<B>,
    ) -> Result<Tensor<B, 2>, KvCacheError> {
        let (q, k, v) = self.project(x);
        cache.append(k, v)?;
        let out = cache.attend(q)?;
        Ok(self.output(out))
    }
}

/// ‖a − b‖ / ‖b‖ over the outputs of every step.
fn relative_difference(a: &[Tensor<B, 2>], b: &[Tensor<B, 2>]) -> Result<f64, String> {
    let flat = |ts: &[Tensor<B, 2>]| -> Result<Vec<f32>, String> {
        Tensor::cat(ts.to_vec(), 0)
            .into_data()
            .to_vec::<f32>()
            .map_err(|e| format!("{e:?}"))
    };
    let (a, b) = (flat(a)?, flat(b)?);
    if a.iter().any(|x| !x.is_finite()) {
        return Ok(f64::INFINITY);
    }
    let num: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y) as f64)
        .map(|d| d * d)
        .sum();
    let den: f64 = b.iter().map(|&y| (y as f64) * (y as f64)).sum();
    Ok((num / den.max(1e-300)).sqrt())
}

fn run() -> Result<(), String> {
    let device = Default::default();
    let layer = Attention::<B>::new(&device);
    let tokens: Vec<Tensor<B, 2>> = (0..TOKENS)
        .map(|_| Tensor::random([BATCH, DIM], Distribution::Normal(0.0, 1.0), &device))
        .collect();

    let mut usual_cache = BurnKvCache::<B>::new(TOKENS, &device);
    let usual: Vec<_> = tokens
        .iter()
        .map(|x| layer.step_usual(x.clone(), &mut usual_cache))
        .collect();

    for sparsity in [0.0, 0.7] {
        let config =
            KvCacheConfig::new(BATCH, KV_HEADS, HEAD_DIM, TOKENS).with_sparsity(sparsity, sparsity);
        let mut cache = SparseKvCache::<B>::new(&config, &device).map_err(|e| e.to_string())?;
        let sparse = tokens
            .iter()
            .map(|x| layer.step_sparse(x.clone(), &mut cache))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let difference = relative_difference(&sparse, &usual)?;
        let memory = cache.memory();
        println!(
            "sparsity {sparsity}: {} of {TOKENS} tokens compressed per sequence, cache {} of {} \
             dense bytes ({:.1}%), outputs {difference:.2e} from the usual layer's",
            cache.compressed_lengths()[0],
            memory.total(),
            memory.dense_equivalent,
            100.0 * memory.total() as f64 / memory.dense_equivalent as f64,
        );
        if sparsity == 0.0 && difference > 1e-4 {
            return Err(format!(
                "at sparsity 0 the sparse cache must compute the usual layer's outputs; they \
                 differ by {difference:e}"
            ));
        }
    }
    println!("at sparsity 0 the sparse cache matches the usual Burn layer");
    Ok(())
}

fn main() -> ExitCode {
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { sparsekv::quiet_vulkan_loader() };
    sparsekv::exit_on_any_thread_panic();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
