//! KV caches for decoding: [`SparseKvCache`] (dense window + compressed segment) and
//! [`DenseKvCache`] (the baseline), behind one trait, [`KvCache`], so a model switches with
//! one line.
//!
//! ```no_run
//! # #[cfg(feature = "wgpu")] {
//! use burn::backend::wgpu::{CubeBackend, WgpuRuntime};
//! use burn::tensor::{Distribution, Tensor};
//! use sparsekv_burn::{KvCache, KvCacheConfig, SparseKvCache};
//!
//! type B = CubeBackend<WgpuRuntime, f32, i32, u32>;
//! let device = Default::default();
//! // One cache per attention layer: 2 sequences, 4 KV heads of 64, up to 4096 tokens,
//! // keys and values pruned to 30% of each row outside the 32-token dense window.
//! let config = KvCacheConfig::new(2, 4, 64, 4096).with_sparsity(0.7, 0.7);
//! let mut cache = SparseKvCache::<B>::new(&config, &device)?;
//!
//! // In the attention layer: keys (after RoPE) and values of the new tokens...
//! let k = Tensor::<B, 4>::random([2, 4, 1, 64], Distribution::Default, &device);
//! let v = Tensor::<B, 4>::random([2, 4, 1, 64], Distribution::Default, &device);
//! cache.append(k, v)?;
//! // ...then attention of the new query (8 query heads: GQA groups of 2) over the cache.
//! let q = Tensor::<B, 3>::random([2, 8, 64], Distribution::Default, &device);
//! let out: Tensor<B, 3> = cache.attend(q)?; // [2, 8, 64]
//! println!("{:.1}% of dense", 100.0 * cache.memory().fraction_of_dense());
//! # }
//! # Ok::<(), sparsekv_burn::KvCacheError>(())
//! ```

use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};
use sparsekv_format::{
    CacheShape, HeadDim, KvBytes, PromptShape, SequenceOccupancy, Sparsity, ValueType, keep_count,
    kv_bytes, layout,
};

use std::sync::{Arc, Mutex};

use crate::backend::{
    CompressTarget, CompressedStreams, ContextLayout, DecodeShape, DenseRows, KV_VIEW_ALIGNMENT,
    RopeHeads, RowCopy, Segment, SparseKvBackend,
};
use crate::error::{KvCacheError, Result};

/// Default number of recent tokens kept dense.
pub const DEFAULT_WINDOW: usize = 32;
/// Default number of tokens compressed at once when the window overflows during decoding.
pub const DEFAULT_CHUNK: usize = 64;

/// Configuration of one layer's cache.
#[derive(Debug, Clone, PartialEq)]
pub struct KvCacheConfig {
    /// Sequences in the batch.
    pub batch: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Elements per head (a power of two from 8 to 256).
    pub head_dim: usize,
    /// Most tokens a sequence can hold.
    pub max_seq: usize,
    /// Recent tokens kept dense (sparse cache only).
    pub window: usize,
    /// Tokens compressed at once when decoding overflows the window (sparse cache only).
    pub chunk: usize,
    /// Fraction of each key row pruned, in `[0, 1)`.
    pub k_sparsity: f64,
    /// Fraction of each value row pruned, in `[0, 1)`.
    pub v_sparsity: f64,
    /// Stored value type; queries, keys and values must have it too.
    pub value_type: ValueType,
    /// How a model puts a prompt into the cache (exact by default).
    pub prefill: PrefillPolicy,
}

/// How a prompt enters a cache, read by the model's prefill.
///
/// - `Exact` (the paper's): the prompt attends densely to itself, then everything outside
///   the window is compressed. The whole prompt's dense keys and values exist for a moment
///   (per layer), and every prompt token's attention is exact.
/// - `Streaming`: the prompt goes in `chunk` tokens at a time: each chunk is appended (older
///   tokens leaving the window are compressed as they would be while decoding) and its
///   queries attend to the cache as it is then. The cache's dense part never exceeds
///   `window + chunk` tokens, so a prompt longer than device memory would hold dense still
///   fits, but later prompt tokens see the pruned versions of earlier ones (as decoding does).
///   Where the backend has a prompt attention kernel (CUDA, 16-bit values) and every sequence
///   takes the same chunk, a chunk's attention expands one layer's cached tokens into a
///   transient dense copy and runs the kernel over it: one layer's dense K/V for a moment
///   (1/layers of a dense cache), in exchange for matrix-unit speed; elsewhere each query
///   row goes through the decode kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrefillPolicy {
    /// Dense attention over the whole prompt, then compression.
    #[default]
    Exact,
    /// Chunk by chunk through the cache.
    Streaming {
        /// Prompt tokens per chunk (at least 1).
        chunk: usize,
    },
}

impl KvCacheConfig {
    /// A configuration with the defaults: window 32, chunk 64, no pruning, f32.
    pub fn new(batch: usize, kv_heads: usize, head_dim: usize, max_seq: usize) -> Self {
        KvCacheConfig {
            batch,
            kv_heads,
            head_dim,
            max_seq,
            window: DEFAULT_WINDOW,
            chunk: DEFAULT_CHUNK,
            k_sparsity: 0.0,
            v_sparsity: 0.0,
            value_type: ValueType::F32,
            prefill: PrefillPolicy::Exact,
        }
    }

    /// Sets the key and value sparsities.
    pub fn with_sparsity(mut self, k: f64, v: f64) -> Self {
        self.k_sparsity = k;
        self.v_sparsity = v;
        self
    }

    /// Sets the dense window.
    pub fn with_window(mut self, window: usize) -> Self {
        self.window = window;
        self
    }

    /// Sets the compression chunk.
    pub fn with_chunk(mut self, chunk: usize) -> Self {
        self.chunk = chunk;
        self
    }

    /// Sets the stored value type.
    pub fn with_value_type(mut self, value_type: ValueType) -> Self {
        self.value_type = value_type;
        self
    }

    /// Sets how a prompt enters the cache.
    pub fn with_prefill(mut self, prefill: PrefillPolicy) -> Self {
        self.prefill = prefill;
        self
    }

    /// The most dense tokens a sequence holds: `window + chunk` while decoding, never more than
    /// `max_seq` (a window larger than the cache keeps everything dense).
    pub(crate) fn dense_limit(&self) -> usize {
        self.window.saturating_add(self.chunk).min(self.max_seq)
    }

    /// Device bytes a [`SparseKvCache`] of this configuration allocates: the K and V bitmaps
    /// and packed values for `max_seq` tokens per stream, and the dense window's four buffers
    /// (docs/FORMAT.md, section 3). [`SparseKvCache::new`] refuses a configuration the device
    /// cannot hold before allocating any of it.
    pub fn sparse_cache_bytes(&self) -> Result<u64> {
        Ok(self.sparse_plan()?.total())
    }

    /// Device bytes a [`DenseKvCache`] of this configuration allocates (K and V, `max_seq`
    /// tokens per stream).
    pub fn dense_cache_bytes(&self) -> Result<u64> {
        Ok(self.dense_plan()?.total())
    }

    /// The buffers of a sparse cache, after validating the configuration.
    fn sparse_plan(&self) -> Result<SparsePlan> {
        let capacity = layout::aligned_capacity(self.max_seq);
        // The dense tokens never pass the cache's own capacity, however large the window.
        let window_capacity = layout::aligned_capacity(self.dense_limit());
        self.sized_plan(capacity, window_capacity)
    }

    /// [`KvCacheConfig::sparse_plan`] for caches that share group buffers
    /// ([`LayerCaches::sparse`]): the stream capacities are rounded up (by at most 256 tokens)
    /// so that each of a layer's buffers is a whole number of [`KV_VIEW_ALIGNMENT`] bytes, so
    /// layer `i`'s part of a group buffer starts `i` buffers in, and the group's streams follow
    /// each other at one stride (what lets one launch work on every layer).
    fn grouped_sparse_plan(&self) -> Result<SparsePlan> {
        let mut plan = self.sparse_plan()?;
        let aligned = |p: &SparsePlan| {
            [p.bitmap, p.k_values, p.v_values]
                .iter()
                .all(|b| b.is_multiple_of(KV_VIEW_ALIGNMENT))
        };
        while !aligned(&plan) {
            plan = self.sized_plan(
                plan.capacity + layout::STREAM_TOKEN_ALIGNMENT,
                plan.window_capacity,
            )?;
        }
        while !plan.window.is_multiple_of(KV_VIEW_ALIGNMENT) {
            plan = self.sized_plan(
                plan.capacity,
                plan.window_capacity + layout::STREAM_TOKEN_ALIGNMENT,
            )?;
        }
        Ok(plan)
    }

    /// The buffers of a sparse cache whose streams hold `capacity` compressed and
    /// `window_capacity` dense tokens, after validating the configuration.
    fn sized_plan(&self, capacity: usize, window_capacity: usize) -> Result<SparsePlan> {
        let (head_dim, k_sparsity, v_sparsity) = self.validate()?;
        let streams = self.batch.checked_mul(self.kv_heads);
        let es = self.value_type.size_bytes();
        let too_big = || {
            KvCacheError::Invalid(format!(
                "a sparse cache of {} sequence(s) x {} KV heads x {} tokens (head_dim {}, window {}, chunk {}) needs more bytes than this machine can address",
                self.batch,
                self.kv_heads,
                self.max_seq,
                head_dim.get(),
                self.window,
                self.chunk
            ))
        };
        let bytes = |rows: usize, per_row: usize| {
            streams
                .and_then(|s| s.checked_mul(rows))
                .and_then(|n| n.checked_mul(per_row))
                .ok_or_else(too_big)
        };
        let values = |s| bytes(capacity, keep_count(s, head_dim) * es);
        Ok(SparsePlan {
            head_dim,
            k_sparsity,
            v_sparsity,
            capacity,
            window_capacity,
            bitmap: bytes(layout::bitmap_words(capacity, head_dim), 4)?,
            k_values: values(k_sparsity)?,
            v_values: values(v_sparsity)?,
            window: bytes(window_capacity, head_dim.get() * es)?,
        })
    }

    /// The buffers of a dense cache, after validating the configuration.
    fn dense_plan(&self) -> Result<DensePlan> {
        let (head_dim, _, _) = self.validate()?;
        let capacity = layout::aligned_capacity(self.max_seq);
        let bytes = [self.kv_heads, capacity, head_dim.get(), self.value_type.size_bytes()]
            .into_iter()
            .try_fold(self.batch, usize::checked_mul)
            .ok_or_else(|| {
                KvCacheError::Invalid(format!(
                    "a dense cache of {} sequences x {} KV heads x {capacity} tokens x {} needs more bytes than this machine can address",
                    self.batch,
                    self.kv_heads,
                    head_dim.get()
                ))
            })?;
        Ok(DensePlan {
            head_dim,
            capacity,
            bytes,
        })
    }

    /// The plan of `layers` sparse caches of this configuration, refused by [`ensure_room`]
    /// when `device` cannot allocate or hold them all.
    /// With `grouped`, the plan of caches in group buffers
    /// ([`KvCacheConfig::grouped_sparse_plan`]).
    fn sparse_plan_on<B: SparseKvBackend>(
        &self,
        layers: usize,
        grouped: bool,
        device: &B::Device,
    ) -> Result<SparsePlan> {
        let plan = if grouped {
            self.grouped_sparse_plan()?
        } else {
            self.sparse_plan()?
        };
        let needed = total_bytes(layers, plan.total())?;
        ensure_room::<B>(device, plan.largest(), needed, || {
            self.describe(layers, "sparse")
        })?;
        Ok(plan)
    }

    /// [`KvCacheConfig::sparse_plan_on`] for dense caches.
    fn dense_plan_on<B: SparseKvBackend>(
        &self,
        layers: usize,
        device: &B::Device,
    ) -> Result<DensePlan> {
        let plan = self.dense_plan()?;
        let needed = total_bytes(layers, plan.total())?;
        ensure_room::<B>(device, plan.bytes, needed, || {
            self.describe(layers, "dense")
        })?;
        Ok(plan)
    }

    /// How the errors name `count` caches of this configuration.
    fn describe(&self, count: usize, kind: &str) -> String {
        format!(
            "{count} {kind} cache(s) of {} sequence(s) x {} KV heads x {} tokens (head_dim {}, {})",
            self.batch,
            self.kv_heads,
            self.max_seq,
            self.head_dim,
            self.value_type.name()
        )
    }

    fn validate(&self) -> Result<(HeadDim, Sparsity, Sparsity)> {
        if self.batch == 0 || self.kv_heads == 0 || self.max_seq == 0 {
            return Err(KvCacheError::Invalid(format!(
                "batch ({}), kv_heads ({}) and max_seq ({}) must be at least 1",
                self.batch, self.kv_heads, self.max_seq
            )));
        }
        if self.chunk == 0 {
            return Err(KvCacheError::Invalid("chunk must be at least 1".into()));
        }
        if self.prefill == (PrefillPolicy::Streaming { chunk: 0 }) {
            return Err(KvCacheError::Invalid(
                "a streaming prefill chunk must be at least 1 token".into(),
            ));
        }
        Ok((
            HeadDim::new(self.head_dim)?,
            Sparsity::new(self.k_sparsity)?,
            Sparsity::new(self.v_sparsity)?,
        ))
    }
}

/// The buffers a [`SparseKvCache`] allocates: one bitmap buffer each for K and V, one value
/// buffer each, and four window buffers (K and V, double-buffered), in bytes each.
#[derive(Clone, Copy)]
struct SparsePlan {
    head_dim: HeadDim,
    k_sparsity: Sparsity,
    v_sparsity: Sparsity,
    capacity: usize,
    window_capacity: usize,
    bitmap: usize,
    k_values: usize,
    v_values: usize,
    window: usize,
}

impl SparsePlan {
    /// The largest buffer, in bytes.
    fn largest(&self) -> usize {
        self.bitmap
            .max(self.k_values)
            .max(self.v_values)
            .max(self.window)
    }

    fn total(&self) -> u64 {
        [
            2 * self.bitmap,
            self.k_values,
            self.v_values,
            4 * self.window,
        ]
        .iter()
        .map(|&b| b as u64)
        .sum()
    }
}

/// The buffers a [`DenseKvCache`] allocates: K and V of `bytes` each.
#[derive(Clone, Copy)]
struct DensePlan {
    head_dim: HeadDim,
    capacity: usize,
    bytes: usize,
}

impl DensePlan {
    fn total(&self) -> u64 {
        2 * self.bytes as u64
    }
}

/// Refuses, before anything is allocated, caches whose largest buffer (`largest` bytes) is
/// larger than the device allocates in one piece, or whose `needed` bytes in all the device
/// cannot hold (where the runtime reports its memory; see [`SparseKvBackend::device_memory`]).
fn ensure_room<B: SparseKvBackend>(
    device: &B::Device,
    largest: usize,
    needed: u64,
    what: impl FnOnce() -> String,
) -> Result<()> {
    let limit = B::max_buffer_bytes(device);
    if largest as u64 > limit {
        return Err(KvCacheError::Allocation {
            bytes: largest,
            limit,
        });
    }
    match B::device_memory(device) {
        Some(memory) if needed > memory.available => Err(KvCacheError::DeviceMemory {
            what: what(),
            needed,
            available: memory.available,
            total: memory.total,
        }),
        _ => Ok(()),
    }
}

/// What every KV cache offers a model.
pub trait KvCache<B: SparseKvBackend> {
    /// Appends `n` tokens to every sequence: `k` and `v` are `[batch, kv_heads, n, head_dim]`
    /// (keys after RoPE).
    fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Result<()> {
        let n = k.dims()[2];
        let counts = vec![n; self.lengths().len()];
        self.append_ragged(k, v, &counts)
    }

    /// Appends `counts[s]` tokens to sequence `s`: the first `counts[s]` of the `n` rows of
    /// `k` and `v` (`[batch, kv_heads, n, head_dim]`, padded past each count).
    fn append_ragged(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>, counts: &[usize]) -> Result<()>;

    /// Appends `counts[s]` tokens to sequence `s` straight from a fused QKV projection:
    /// `qkv` `[batch, n, (q_heads + 2 kv_heads) · head_dim]` (padded past each count), whose
    /// queries and keys are rotated at each sequence's next positions (token `t` of sequence
    /// `s` at `lengths()[s] + t`: the cache is the one record of positions, so RoPE never
    /// disagrees with what attention sees). Returns the rotated queries
    /// `[batch, n, q_heads, head_dim]`. Where the new keys and values all go to dense rows (a
    /// decode step of [`SparseKvCache`], any append of [`DenseKvCache`]) the rotation writes
    /// them there itself: one launch, no key and value tensors; otherwise (a sparse cache's
    /// prompt, whose older tokens are compressed straight from its rows, or a cache without
    /// its own implementation) it is [`SparseKvBackend::rope_split`] and then
    /// [`Self::append_ragged`].
    fn append_qkv(
        &mut self,
        qkv: Tensor<B, 3>,
        rope: &RopeTables<B>,
        counts: &[usize],
    ) -> Result<Tensor<B, 4>> {
        split_then_append(self, qkv, rope, counts)
    }

    /// Attention of one query per sequence and query head, `q` `[batch, q_heads, head_dim]`,
    /// over everything cached; `q_heads` must be a multiple of `kv_heads`. Returns
    /// `[batch, q_heads, head_dim]`.
    fn attend(&self, q: Tensor<B, 3>) -> Result<Tensor<B, 3>>;

    /// Causal attention of the queries of each sequence's newest tokens (a prompt chunk just
    /// appended): `q` `[batch, n, q_heads, head_dim]`, where row `i < counts[s]` of sequence
    /// `s` is the query of its `counts[s] - i`-th newest token and attends to the cached
    /// tokens up to and including that token, as they are cached now (older ones compressed).
    /// Rows past a sequence's count (padding) attend to everything and are to be ignored.
    /// Returns `[batch, n, q_heads, head_dim]`.
    fn attend_newest(&self, q: Tensor<B, 4>, counts: &[usize]) -> Result<Tensor<B, 4>>;

    /// How a prompt enters this cache ([`KvCacheConfig::prefill`]).
    fn prefill_policy(&self) -> PrefillPolicy;

    /// Tokens held per sequence.
    fn lengths(&self) -> Vec<usize>;

    /// Tokens held compressed, per sequence (all zero for a dense cache).
    fn compressed_counts(&self) -> Vec<usize>;

    /// Bytes in use and their dense equivalent (docs/FORMAT.md accounting).
    fn memory(&self) -> KvBytes;

    /// Bytes of device memory the cache has allocated.
    fn allocated_bytes(&self) -> usize;
}

/// Every cache operation starts here: the device-thread watch is installed (once per
/// process) and an earlier failure of a device thread is an error (see [`crate::runtime`]).
fn device_ready() -> Result<()> {
    crate::runtime::watch_device_threads();
    crate::runtime::check_device_threads()
}

/// Rotary position embeddings as [`KvCache::append_qkv`] applies them: the model's angle
/// tables and its heads.
#[derive(Debug, Clone)]
pub struct RopeTables<B: SparseKvBackend> {
    /// Cosines of every position's angles, `[positions, head_dim / 2]`, the model's float type.
    pub cos: Tensor<B, 2>,
    /// Sines of the same angles.
    pub sin: Tensor<B, 2>,
    /// The heads of the fused QKV projection and how their channels pair up.
    pub heads: RopeHeads,
}

impl<B: SparseKvBackend> RopeTables<B> {
    /// The `cos` and `sin` tables as the backend's float tensors.
    fn primitives(&self) -> [FloatTensor<B>; 2] {
        [&self.cos, &self.sin].map(|t| t.clone().into_primitive().tensor())
    }
}

/// A backend float tensor as a tensor of rank `D`.
fn float<B: SparseKvBackend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// [`KvCache::append_qkv`] in two steps: the RoPE split into query, key and value tensors,
/// then [`KvCache::append_ragged`] of the keys and values.
fn split_then_append<B: SparseKvBackend, C: KvCache<B> + ?Sized>(
    cache: &mut C,
    qkv: Tensor<B, 3>,
    rope: &RopeTables<B>,
    counts: &[usize],
) -> Result<Tensor<B, 4>> {
    let starts = cache.lengths();
    let [cos, sin] = rope.primitives();
    let [q, k, v] = B::rope_split(qkv.into_primitive().tensor(), cos, sin, &starts, rope.heads)?;
    cache.append_ragged(float(k), float(v), counts)?;
    Ok(float(q))
}

/// [`SparseKvBackend::rope_append`] of a cache's new rows: queries and keys of `qkv` rotated
/// at `starts`, keys and values written into `rows` (the cache's key and value buffers) as
/// `copy` says; returns the queries.
fn rope_into_rows<B: SparseKvBackend>(
    qkv: Tensor<B, 3>,
    rope: &RopeTables<B>,
    starts: &[usize],
    rows: [&B::KvBuffer; 2],
    value_type: ValueType,
    copy: &RowCopy,
) -> Result<Tensor<B, 4>> {
    let [cos, sin] = rope.primitives();
    let q = B::rope_append(
        qkv.into_primitive().tensor(),
        cos,
        sin,
        starts,
        rope.heads,
        rows,
        value_type,
        copy,
    )?;
    Ok(float(q))
}

/// Whether [`KvCache::append_qkv`] of `qkv` takes the one-launch path of a cache whose new
/// rows go to dense rows, checked: always where `prompts` (the dense cache), else for a
/// decode step's projection (`[batch, 1, ..]`); a sparse cache's prompt takes the two-step
/// path, which checks it itself.
fn one_launch_append<B: SparseKvBackend>(
    config: &KvCacheConfig,
    device: &B::Device,
    (qkv, rope): (&Tensor<B, 3>, &RopeTables<B>),
    counts: &[usize],
    lengths: &[usize],
    prompts: bool,
) -> Result<bool> {
    device_ready()?;
    let [b, n, width] = qkv.dims();
    if n != 1 && !prompts {
        return Ok(false);
    }
    let heads = rope.heads;
    let expected = vec![
        config.batch,
        n,
        (heads.q_heads + 2 * config.kv_heads) * config.head_dim,
    ];
    if heads.kv_heads != config.kv_heads || vec![b, n, width] != expected {
        return Err(KvCacheError::Shape {
            what: "fused QKV rows (the RoPE heads' KV heads must be the cache's)",
            expected,
            actual: vec![b, n, width],
        });
    }
    if &qkv.device() != device {
        return Err(KvCacheError::Device("fused QKV rows"));
    }
    check_counts(config, counts, n, lengths)?;
    Ok(true)
}

/// Checks that `counts` give one count per sequence of at most `rows` new rows, within each
/// sequence's capacity.
fn check_counts(
    config: &KvCacheConfig,
    counts: &[usize],
    rows: usize,
    lengths: &[usize],
) -> Result<()> {
    if counts.len() != config.batch || counts.iter().any(|&c| c > rows) {
        return Err(KvCacheError::Invalid(format!(
            "counts {counts:?} must give one count per sequence ({}), each at most {rows} rows",
            config.batch
        )));
    }
    for (s, (&len, &c)) in lengths.iter().zip(counts).enumerate() {
        if len + c > config.max_seq {
            return Err(KvCacheError::Capacity {
                sequence: s,
                needed: len + c,
                max_seq: config.max_seq,
            });
        }
    }
    Ok(())
}

/// Common argument checks of `append_ragged`.
fn check_append<B: SparseKvBackend>(
    config: &KvCacheConfig,
    device: &B::Device,
    k: &Tensor<B, 4>,
    v: &Tensor<B, 4>,
    counts: &[usize],
    lengths: &[usize],
) -> Result<()> {
    device_ready()?;
    let kd = k.dims();
    let expected = vec![config.batch, config.kv_heads, kd[2], config.head_dim];
    for (what, t) in [("keys", k), ("values", v)] {
        if t.dims().to_vec() != expected {
            return Err(KvCacheError::Shape {
                what,
                expected: expected.clone(),
                actual: t.dims().to_vec(),
            });
        }
        if &t.device() != device {
            return Err(KvCacheError::Device(what));
        }
        let vt = B::kv_value_type(&t.clone().into_primitive().tensor())?;
        if vt != config.value_type {
            return Err(KvCacheError::DType {
                what,
                expected: config.value_type.name(),
                actual: t.dtype(),
            });
        }
    }
    check_counts(config, counts, kd[2], lengths)
}

/// Common argument checks of `attend`; returns the query heads.
fn check_query<B: SparseKvBackend>(
    config: &KvCacheConfig,
    device: &B::Device,
    q: &Tensor<B, 3>,
    lengths: &[usize],
) -> Result<usize> {
    check_query_parts::<B>(config, device, q.dims(), &q.device(), lengths)
}

/// [`check_query`] on the shape `[batch, q_heads, head_dim]` and device of the queries.
fn check_query_parts<B: SparseKvBackend>(
    config: &KvCacheConfig,
    device: &B::Device,
    [batch, q_heads, d]: [usize; 3],
    q_device: &B::Device,
    lengths: &[usize],
) -> Result<usize> {
    device_ready()?;
    if batch != config.batch
        || d != config.head_dim
        || q_heads == 0
        || !q_heads.is_multiple_of(config.kv_heads)
    {
        return Err(KvCacheError::Shape {
            what: "queries (query heads must be a multiple of the KV heads)",
            expected: vec![config.batch, config.kv_heads, config.head_dim],
            actual: vec![batch, q_heads, d],
        });
    }
    if q_device != device {
        return Err(KvCacheError::Device("queries"));
    }
    if let Some(s) = lengths.iter().position(|&l| l == 0) {
        return Err(KvCacheError::Invalid(format!(
            "sequence {s} holds no tokens to attend to"
        )));
    }
    Ok(q_heads)
}

/// Common argument checks of `attend_newest`; returns the query heads and the rows per
/// sequence.
fn check_newest<B: SparseKvBackend>(
    config: &KvCacheConfig,
    device: &B::Device,
    q: &Tensor<B, 4>,
    counts: &[usize],
    lengths: &[usize],
) -> Result<(usize, usize)> {
    let [batch, n, q_heads, d] = q.dims();
    let q_heads =
        check_query_parts::<B>(config, device, [batch, q_heads, d], &q.device(), lengths)?;
    if counts.len() != config.batch
        || counts
            .iter()
            .zip(lengths)
            .any(|(&c, &len)| c > n || c > len)
    {
        return Err(KvCacheError::Invalid(format!(
            "counts {counts:?} must give one count per sequence ({}), each at most the {n} query \
             rows and the tokens it holds ({lengths:?})",
            config.batch
        )));
    }
    Ok((q_heads, n))
}

/// The decode-attention shape of `q_heads` query heads over sequences holding `lengths[s]`
/// tokens, the first `compressed[s]` of them compressed. Without `newest`, one query row per
/// sequence sees all of them; with `newest = (counts, n)`, sequence `s` has `n` rows for its
/// `counts[s]` newest tokens, row `i` seeing the tokens up to and including its own (rows past
/// the count: all of them).
fn decode_shape(
    config: &KvCacheConfig,
    head_dim: HeadDim,
    q_heads: usize,
    compressed: &[usize],
    lengths: &[usize],
    newest: Option<(&[usize], usize)>,
) -> DecodeShape {
    let rows_per_sequence = newest.map_or(1, |(_, n)| n);
    let rows = lengths.len() * rows_per_sequence;
    let mut shape = DecodeShape {
        q_heads,
        kv_heads: config.kv_heads,
        head_dim,
        compressed_lens: Vec::with_capacity(rows),
        dense_lens: Vec::with_capacity(rows),
        row_sequences: Vec::with_capacity(rows),
    };
    for (s, (&c, &len)) in compressed.iter().zip(lengths).enumerate() {
        for i in 0..rows_per_sequence {
            let seen = match newest {
                Some((counts, _)) if i < counts[s] => len - counts[s] + i + 1,
                _ => len,
            };
            let c = c.min(seen);
            shape.compressed_lens.push(c as u32);
            shape.dense_lens.push((seen - c) as u32);
            shape.row_sequences.push(s as u32);
        }
    }
    shape
}

/// Checks the query of `attend` and lays out its rows: one per sequence, seeing all of its
/// `lengths[s]` tokens, the first `compressed[s]` of them compressed.
fn decode_rows<B: SparseKvBackend>(
    config: &KvCacheConfig,
    device: &B::Device,
    head_dim: HeadDim,
    compressed: &[usize],
    lengths: &[usize],
    q: &Tensor<B, 3>,
) -> Result<DecodeShape> {
    let q_heads = check_query(config, device, q, lengths)?;
    Ok(decode_shape(
        config, head_dim, q_heads, compressed, lengths, None,
    ))
}

/// Checks the queries of `attend_newest` and lays out their rows (see [`decode_shape`]);
/// returns the layout and the queries' shape `[batch, n, q_heads, head_dim]`.
fn newest_rows<B: SparseKvBackend>(
    config: &KvCacheConfig,
    device: &B::Device,
    head_dim: HeadDim,
    compressed: &[usize],
    lengths: &[usize],
    q: &Tensor<B, 4>,
    counts: &[usize],
) -> Result<(DecodeShape, [usize; 4])> {
    let (q_heads, n) = check_newest(config, device, q, counts, lengths)?;
    let shape = decode_shape(
        config,
        head_dim,
        q_heads,
        compressed,
        lengths,
        Some((counts, n)),
    );
    Ok((shape, q.dims()))
}

/// The window policy, part 1: per sequence, the oldest tokens its dense window gives up before
/// taking more. A full window (`window + chunk` dense tokens) with tokens still to come
/// (`remaining`) gives up its oldest chunk.
pub(crate) fn room_to_make(
    config: &KvCacheConfig,
    dense: &[usize],
    remaining: &[usize],
) -> Vec<usize> {
    let full = config.dense_limit();
    dense
        .iter()
        .zip(remaining)
        .map(|(&d, &r)| {
            if r > 0 && d >= full {
                config.chunk.min(d)
            } else {
                0
            }
        })
        .collect()
}

/// The window policy, part 2: after a prompt (more than one token appended to a sequence),
/// only its newest `window` tokens stay dense; returns how many older ones leave the window.
pub(crate) fn prompt_excess(
    config: &KvCacheConfig,
    dense: &[usize],
    counts: &[usize],
) -> Vec<usize> {
    dense
        .iter()
        .zip(counts)
        .map(|(&d, &c)| {
            if c > 1 {
                d.saturating_sub(config.window)
            } else {
                0
            }
        })
        .collect()
}

fn to_u32(v: &[usize]) -> Vec<u32> {
    v.iter().map(|&x| x as u32).collect()
}

/// A sparse KV cache for one layer: per sequence, the most recent tokens dense (between
/// `window` and `window + chunk` while decoding) and older tokens pruned by magnitude and
/// compressed (docs/FORMAT.md).
///
/// - An append of more than one token per sequence (prefill) leaves exactly the newest
///   `window` tokens dense and compresses the rest.
/// - A one-token append (decode) compresses the oldest `chunk` tokens only when the window
///   is full.
///
/// Storage is allocated once for `max_seq` tokens; appends and attention launch kernels and
/// never wait for the device.
pub struct SparseKvCache<B: SparseKvBackend> {
    config: KvCacheConfig,
    plan: SparsePlan,
    device: B::Device,
    buffers: SparseBuffers<B>,
    state: WindowState,
    /// The group of layers whose buffers this cache's are part of ([`LayerCaches::sparse`]).
    group: Option<GroupLink<B>>,
}

impl<B: SparseKvBackend> std::fmt::Debug for SparseKvCache<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseKvCache")
            .field("config", &self.config)
            .field("compressed", &self.state.compressed)
            .field("dense", &self.state.dense)
            .field("grouped", &self.group.is_some())
            .finish()
    }
}

/// The device buffers of a sparse cache (or of a group of layers' caches, whose streams follow
/// each other layer by layer): K and V bitmaps and packed values, and two dense windows each
/// for K and V (one holds the window, the other is the target of compaction after a
/// compression).
#[derive(Debug, Clone)]
struct SparseBuffers<B: SparseKvBackend> {
    k_bitmap: B::KvBuffer,
    v_bitmap: B::KvBuffer,
    k_values: B::KvBuffer,
    v_values: B::KvBuffer,
    k_window: [B::KvBuffer; 2],
    v_window: [B::KvBuffer; 2],
}

impl<B: SparseKvBackend> SparseBuffers<B> {
    /// Buffers of `plan` for `layers` layers.
    fn allocate(plan: &SparsePlan, layers: usize, device: &B::Device) -> Result<Self> {
        let alloc = |bytes: usize| B::kv_alloc(device, bytes * layers);
        Ok(SparseBuffers {
            k_bitmap: alloc(plan.bitmap)?,
            v_bitmap: alloc(plan.bitmap)?,
            k_values: alloc(plan.k_values)?,
            v_values: alloc(plan.v_values)?,
            k_window: [alloc(plan.window)?, alloc(plan.window)?],
            v_window: [alloc(plan.window)?, alloc(plan.window)?],
        })
    }

    /// Layer `layer`'s part of a group's buffers of `plan` (views, nothing copied).
    fn layer(&self, plan: &SparsePlan, layer: usize) -> Result<Self> {
        let view = |buffer: &B::KvBuffer, bytes: usize| B::kv_view(buffer, layer * bytes, bytes);
        let windows = |pair: &[B::KvBuffer; 2]| -> Result<[B::KvBuffer; 2]> {
            Ok([view(&pair[0], plan.window)?, view(&pair[1], plan.window)?])
        };
        Ok(SparseBuffers {
            k_bitmap: view(&self.k_bitmap, plan.bitmap)?,
            v_bitmap: view(&self.v_bitmap, plan.bitmap)?,
            k_values: view(&self.k_values, plan.k_values)?,
            v_values: view(&self.v_values, plan.v_values)?,
            k_window: windows(&self.k_window)?,
            v_window: windows(&self.v_window)?,
        })
    }

    /// Where keys and values of `plan` are compressed to (shared handles).
    fn compressed_streams(&self, plan: &SparsePlan) -> [CompressedStreams<B>; 2] {
        [
            CompressedStreams {
                bitmap: self.k_bitmap.clone(),
                values: self.k_values.clone(),
                sparsity: plan.k_sparsity,
            },
            CompressedStreams {
                bitmap: self.v_bitmap.clone(),
                values: self.v_values.clone(),
                sparsity: plan.v_sparsity,
            },
        ]
    }

    fn all(&self) -> impl Iterator<Item = &B::KvBuffer> {
        [
            &self.k_bitmap,
            &self.v_bitmap,
            &self.k_values,
            &self.v_values,
        ]
        .into_iter()
        .chain(self.k_window.iter())
        .chain(self.v_window.iter())
    }
}

/// Where a sparse cache stands: per sequence, its compressed tokens and its window tokens
/// (after the compressed ones), and which of the two window buffers holds the window.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WindowState {
    compressed: Vec<usize>,
    dense: Vec<usize>,
    current: usize,
}

impl WindowState {
    fn empty(batch: usize) -> Self {
        WindowState {
            compressed: vec![0; batch],
            dense: vec![0; batch],
            current: 0,
        }
    }

    /// The state after the oldest `counts[s]` window tokens of each sequence were compressed
    /// and the rest of the window compacted into the other window buffer.
    fn after_compressing(&self, counts: &[usize]) -> Self {
        WindowState {
            compressed: self
                .compressed
                .iter()
                .zip(counts)
                .map(|(t, c)| t + c)
                .collect(),
            dense: self.dense.iter().zip(counts).map(|(w, c)| w - c).collect(),
            current: 1 - self.current,
        }
    }

    /// Each sequence's compressed and window tokens.
    fn occupancy(&self) -> impl Iterator<Item = SequenceOccupancy> + '_ {
        self.compressed
            .iter()
            .zip(&self.dense)
            .map(|(&c, &w)| SequenceOccupancy {
                compressed_tokens: c,
                window_tokens: w,
            })
    }
}

/// Launches the window policy's compression over `buffers` holding the streams of `layers`
/// layers of `plan` (one cache's, or a whole group's, all in `state`): the oldest `counts[s]`
/// window tokens of each sequence are pruned and compressed after its compressed tokens
/// (keys and values in one launch), and the rest of each window moves to the front of the
/// other window buffer (one launch). Two launches and two uploads however many layers.
fn launch_compression<B: SparseKvBackend>(
    device: &B::Device,
    config: &KvCacheConfig,
    plan: &SparsePlan,
    buffers: &SparseBuffers<B>,
    layers: usize,
    state: &WindowState,
    counts: &[usize],
) -> Result<()> {
    // A group's layers are sequences of their own to the kernels: layer l's sequence s is
    // sequence l b + s, its streams right after layer l - 1's.
    let each_layer = |v: Vec<u32>| v.repeat(layers);
    let n = to_u32(counts);
    let cur = state.current;
    let rows = RowCopy {
        sequences: layers * config.batch,
        kv_heads: config.kv_heads,
        head_dim: plan.head_dim,
        src_capacity: plan.window_capacity,
        dst_capacity: plan.capacity,
        src_start: vec![0; layers * config.batch],
        dst_start: each_layer(to_u32(&state.compressed)),
        counts: each_layer(n.clone()),
    };
    let [k_dest, v_dest] = buffers.compressed_streams(plan);
    let targets = [
        CompressTarget {
            src: buffers.k_window[cur].clone(),
            dest: k_dest,
        },
        CompressTarget {
            src: buffers.v_window[cur].clone(),
            dest: v_dest,
        },
    ];
    let vt = config.value_type;
    B::kv_prune_compress(device, &targets, vt, &rows)?;
    let remaining = state.after_compressing(counts).dense;
    let copy = RowCopy {
        dst_capacity: plan.window_capacity,
        src_start: each_layer(n),
        dst_start: vec![0; layers * config.batch],
        counts: each_layer(to_u32(&remaining)),
        ..rows
    };
    B::kv_copy_rows(
        device,
        &[
            (&buffers.k_window[cur], &buffers.k_window[1 - cur]),
            (&buffers.v_window[cur], &buffers.v_window[1 - cur]),
        ],
        vt,
        &copy,
    )
}

/// The layers of a group ([`LayerCaches::sparse`]): their buffers as wholes, and what the
/// window policy needs to run a compression for all of them at once.
struct LayerGroup<B: SparseKvBackend> {
    buffers: SparseBuffers<B>,
    /// Each layer's state as its latest append left it.
    states: Vec<WindowState>,
    /// The compression last run for every layer of the group, for the layers that have not
    /// taken it up yet.
    ahead: Option<GroupCompression>,
}

/// A compression that ran for every layer of a group from one state.
struct GroupCompression {
    from: WindowState,
    counts: Vec<usize>,
    /// Per layer: whether it is still to take the compression up.
    pending: Vec<bool>,
}

/// A cache's place in its group.
struct GroupLink<B: SparseKvBackend> {
    group: Arc<Mutex<LayerGroup<B>>>,
    layer: usize,
}

impl<B: SparseKvBackend> GroupLink<B> {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, LayerGroup<B>>> {
        self.group
            .lock()
            .map_err(|_| KvCacheError::Invalid("a layer group's lock is poisoned".into()))
    }

    /// The window policy's compression of `counts` tokens per sequence for this layer, in
    /// `state`, through the group: `true` when it is done, because another layer of the group
    /// already ran it for every layer from the same state or because every layer is in that
    /// state and this call ran it for all of them; `false` when the layers are out of step
    /// (the caller compresses its layer alone). Running it for every layer is safe whatever
    /// they do next: it writes only where a layer in `state` holds nothing (compressed
    /// positions past its tokens, its idle window buffer), and a layer whose next compression
    /// differs overwrites those places itself.
    fn compress(
        &self,
        device: &B::Device,
        config: &KvCacheConfig,
        plan: &SparsePlan,
        state: &WindowState,
        counts: &[usize],
    ) -> Result<bool> {
        let mut group = self.lock()?;
        if let Some(ahead) = &mut group.ahead
            && ahead.pending[self.layer]
            && ahead.from == *state
            && ahead.counts == counts
        {
            ahead.pending[self.layer] = false;
            return Ok(true);
        }
        if group.states.iter().any(|s| s != state) {
            return Ok(false);
        }
        let layers = group.states.len();
        launch_compression(device, config, plan, &group.buffers, layers, state, counts)?;
        let mut pending = vec![true; layers];
        pending[self.layer] = false;
        group.ahead = Some(GroupCompression {
            from: state.clone(),
            counts: counts.to_vec(),
            pending,
        });
        Ok(true)
    }

    /// Records this layer's state after an append.
    fn record(&self, state: &WindowState) -> Result<()> {
        self.lock()?.states[self.layer] = state.clone();
        Ok(())
    }
}

impl<B: SparseKvBackend> SparseKvCache<B> {
    /// Allocates a cache for `config` on `device`; [`KvCacheError::DeviceMemory`] (nothing
    /// allocated) when the device cannot hold it.
    pub fn new(config: &KvCacheConfig, device: &B::Device) -> Result<Self> {
        device_ready()?;
        let plan = config.sparse_plan_on::<B>(1, false, device)?;
        Ok(SparseKvCache {
            config: config.clone(),
            plan,
            device: device.clone(),
            buffers: SparseBuffers::allocate(&plan, 1, device)?,
            state: WindowState::empty(config.batch),
            group: None,
        })
    }

    /// The caches of `layers` layers of `plan` (checked by the caller), in groups of layers
    /// that share buffers: as many layers per group as keep a group buffer within what the
    /// device allocates in one piece and within 2 GiB (so that kernels index it with 32-bit
    /// integers).
    fn grouped(
        layers: usize,
        config: &KvCacheConfig,
        plan: SparsePlan,
        device: &B::Device,
    ) -> Result<Vec<Self>> {
        let limit = B::max_buffer_bytes(device).min(GROUP_BYTES_LIMIT) as usize;
        let per_group = (limit / plan.largest().max(1)).clamp(1, layers.max(1));
        let mut caches = Vec::with_capacity(layers);
        for first in (0..layers).step_by(per_group) {
            let size = per_group.min(layers - first);
            let whole = SparseBuffers::allocate(&plan, size, device)?;
            let parts = (0..size)
                .map(|l| whole.layer(&plan, l))
                .collect::<Result<Vec<_>>>()?;
            let group = Arc::new(Mutex::new(LayerGroup {
                buffers: whole,
                states: vec![WindowState::empty(config.batch); size],
                ahead: None,
            }));
            for (layer, buffers) in parts.into_iter().enumerate() {
                caches.push(SparseKvCache {
                    config: config.clone(),
                    plan,
                    device: device.clone(),
                    buffers,
                    state: WindowState::empty(config.batch),
                    group: (size > 1).then(|| GroupLink {
                        group: group.clone(),
                        layer,
                    }),
                });
            }
        }
        Ok(caches)
    }

    /// The configuration.
    pub fn config(&self) -> &KvCacheConfig {
        &self.config
    }

    /// Compressed tokens per sequence.
    pub fn compressed_lengths(&self) -> &[usize] {
        &self.state.compressed
    }

    /// Dense (window) tokens per sequence.
    pub fn window_lengths(&self) -> &[usize] {
        &self.state.dense
    }

    /// The compressed streams (shared handles, nothing copied).
    fn segment(&self) -> Segment<B> {
        let b = &self.buffers;
        Segment {
            k_bitmap: b.k_bitmap.clone(),
            k_values: b.k_values.clone(),
            v_bitmap: b.v_bitmap.clone(),
            v_values: b.v_values.clone(),
            capacity: self.plan.capacity,
            k_sparsity: self.plan.k_sparsity,
            v_sparsity: self.plan.v_sparsity,
        }
    }

    /// The current window buffers (shared handles).
    fn window_rows(&self) -> DenseRows<B> {
        let cur = self.state.current;
        DenseRows {
            k: self.buffers.k_window[cur].clone(),
            v: self.buffers.v_window[cur].clone(),
            capacity: self.plan.window_capacity,
        }
    }

    /// Attention of the query rows `q` `[rows, q_heads, head_dim]` as `shape` lays them out.
    fn attend_rows(&self, q: Tensor<B, 3>, shape: &DecodeShape) -> Result<Tensor<B, 3>> {
        let out = B::kv_decode_attention(
            q.into_primitive().tensor(),
            Some(&self.segment()),
            &self.window_rows(),
            shape,
        )?;
        Ok(float(out))
    }

    /// [`KvCache::attend_newest`] through the prompt attention kernel, where it applies: every
    /// sequence appended the chunk's `n` rows and holds as many tokens as the others, and the
    /// backend has the kernel for the shape. The cache's tokens are expanded back to dense
    /// rows (one layer's transient, [`SparseKvBackend::kv_expand_context`]) and the chunk's
    /// queries attend to them as the last `n` of the context. `None` where it does not apply
    /// (the caller goes through the decode kernel, one query row at a time: the same result,
    /// at a cost that grows with rows times context).
    fn attend_newest_expanded(
        &self,
        q: &Tensor<B, 4>,
        counts: &[usize],
        lengths: &[usize],
    ) -> Result<Option<Tensor<B, 4>>> {
        let [b, n, q_heads, d] = q.dims();
        let context = lengths.first().copied().unwrap_or(0);
        // The expansion and the kernel index elements with 32-bit integers (the queries and
        // the expanded keys, whose streams are at least as long as the compressed ones).
        let largest = (b * n * q_heads * d)
            .max(b * self.config.kv_heads * context.max(self.plan.capacity) * d);
        if n < 2
            || counts.iter().any(|&c| c != n)
            || lengths.iter().any(|&l| l != context)
            || largest > u32::MAX as usize
        {
            return Ok(None);
        }
        let c = &self.config;
        // The kernel takes queries of the cache's value type only.
        if B::kv_value_type(&q.clone().into_primitive().tensor()).ok() != Some(c.value_type) {
            return Ok(None);
        }
        let shape = PromptShape::new(b, n, q_heads, c.kv_heads, self.plan.head_dim)?
            .with_past(context - n)?;
        if B::prompt_attention_unsupported(&self.device, c.value_type, shape).is_some() {
            return Ok(None);
        }
        let layout = ContextLayout {
            kv_heads: c.kv_heads,
            head_dim: self.plan.head_dim,
            value_type: c.value_type,
            compressed_lens: to_u32(&self.state.compressed),
            dense_lens: to_u32(&self.state.dense),
            context,
        };
        let [k, v] =
            B::kv_expand_context(&self.device, &self.segment(), &self.window_rows(), &layout)?;
        let out = B::prompt_attention(q.clone().into_primitive().tensor(), k, v)?;
        Ok(Some(float(out)))
    }

    /// Where new rows go in the current window: `take[s]` rows of sequence `s`, from row
    /// `from[s]` of the `rows` appended, after its dense tokens.
    fn window_destination(&self, rows: usize, from: &[usize], take: &[usize]) -> RowCopy {
        RowCopy {
            sequences: self.config.batch,
            kv_heads: self.config.kv_heads,
            head_dim: self.plan.head_dim,
            src_capacity: rows,
            dst_capacity: self.plan.window_capacity,
            src_start: to_u32(from),
            dst_start: to_u32(&self.state.dense),
            counts: to_u32(take),
        }
    }

    /// Counts `take[s]` rows just written to each sequence's window and records the state
    /// for the cache's layer group.
    fn count_window_rows(&mut self, take: &[usize]) -> Result<()> {
        for (dense, n) in self.state.dense.iter_mut().zip(take) {
            *dense += n;
        }
        if let Some(link) = &self.group {
            link.record(&self.state)?;
        }
        Ok(())
    }

    /// Compresses the oldest `counts[s]` dense tokens of each sequence and compacts the
    /// windows into the other buffer pair: through the group where there is one (one launch
    /// pair for all its layers, see [`GroupLink::compress`]), else for this layer alone.
    fn compress_oldest(&mut self, counts: &[usize]) -> Result<()> {
        if counts.iter().all(|&c| c == 0) {
            return Ok(());
        }
        let (device, config, plan) = (&self.device, &self.config, &self.plan);
        let by_group = match &self.group {
            Some(link) => link.compress(device, config, plan, &self.state, counts)?,
            None => false,
        };
        if !by_group {
            launch_compression(device, config, plan, &self.buffers, 1, &self.state, counts)?;
        }
        self.state = self.state.after_compressing(counts);
        Ok(())
    }
}

impl<B: SparseKvBackend> KvCache<B> for SparseKvCache<B> {
    fn append_ragged(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>, counts: &[usize]) -> Result<()> {
        check_append(&self.config, &self.device, &k, &v, counts, &self.lengths())?;
        let (b, h, d, vt) = (
            self.config.batch,
            self.config.kv_heads,
            self.plan.head_dim,
            self.config.value_type,
        );
        let rows = k.dims()[2];
        let (k, v) = (k.into_primitive().tensor(), v.into_primitive().tensor());
        // Per sequence: `from_window` of its dense tokens and the oldest `from_rows` of the
        // appended ones are compressed, the rest of the appended ones join the window. A
        // prompt (more than one token) leaves its newest `window` tokens dense and compresses
        // everything older, straight from the appended rows (one launch each for K and V, not
        // one per chunk through the window); a decode token first makes room in a full window
        // by compressing its oldest chunk. Pruning is per token, so where a token is
        // compressed from does not change its bits.
        let (mut from_window, mut from_rows) = (vec![0usize; b], vec![0usize; b]);
        let room = room_to_make(&self.config, &self.state.dense, counts);
        for s in 0..b {
            if counts[s] > 1 {
                let total = self.state.dense[s] + counts[s];
                let older = total - total.min(self.config.window);
                from_window[s] = older.min(self.state.dense[s]);
                from_rows[s] = older - from_window[s];
            } else {
                from_window[s] = room[s];
            }
        }
        self.compress_oldest(&from_window)?;
        if from_rows.iter().any(|&n| n > 0) {
            let copy = RowCopy {
                sequences: b,
                kv_heads: h,
                head_dim: d,
                src_capacity: rows,
                dst_capacity: self.plan.capacity,
                src_start: vec![0; b],
                dst_start: to_u32(&self.state.compressed),
                counts: to_u32(&from_rows),
            };
            let [k_dest, v_dest] = self.buffers.compressed_streams(&self.plan);
            B::kv_compress_rows(vec![(k.clone(), k_dest), (v.clone(), v_dest)], vt, &copy)?;
            for (total, n) in self.state.compressed.iter_mut().zip(&from_rows) {
                *total += n;
            }
        }
        let take: Vec<usize> = (0..b).map(|s| counts[s] - from_rows[s]).collect();
        if take.iter().any(|&n| n > 0) {
            let copy = self.window_destination(rows, &from_rows, &take);
            let cur = self.state.current;
            B::kv_write_rows(
                &[
                    (k, &self.buffers.k_window[cur]),
                    (v, &self.buffers.v_window[cur]),
                ],
                vt,
                &copy,
            )?;
        }
        self.count_window_rows(&take)
    }

    fn append_qkv(
        &mut self,
        qkv: Tensor<B, 3>,
        rope: &RopeTables<B>,
        counts: &[usize],
    ) -> Result<Tensor<B, 4>> {
        let lengths = self.lengths();
        let c = &self.config;
        if !one_launch_append(c, &self.device, (&qkv, rope), counts, &lengths, false)? {
            return split_then_append(self, qkv, rope, counts);
        }
        // A decode step: a full window first makes room (as `append_ragged` does), then the
        // rotation writes each new key and value after the window's dense tokens.
        let room = room_to_make(&self.config, &self.state.dense, counts);
        self.compress_oldest(&room)?;
        let copy = self.window_destination(1, &vec![0; counts.len()], counts);
        let cur = self.state.current;
        let window = [&self.buffers.k_window[cur], &self.buffers.v_window[cur]];
        let q = rope_into_rows(qkv, rope, &lengths, window, self.config.value_type, &copy)?;
        self.count_window_rows(counts)?;
        Ok(q)
    }

    fn attend(&self, q: Tensor<B, 3>) -> Result<Tensor<B, 3>> {
        let lengths = self.lengths();
        let c = &self.config;
        let shape = decode_rows(
            c,
            &self.device,
            self.plan.head_dim,
            &self.state.compressed,
            &lengths,
            &q,
        )?;
        self.attend_rows(q, &shape)
    }

    fn attend_newest(&self, q: Tensor<B, 4>, counts: &[usize]) -> Result<Tensor<B, 4>> {
        let lengths = self.lengths();
        let c = &self.config;
        let (q_heads, n) = check_newest(c, &self.device, &q, counts, &lengths)?;
        if let Some(out) = self.attend_newest_expanded(&q, counts, &lengths)? {
            return Ok(out);
        }
        // The decode kernel's row layout, only where it runs (a prompt chunk's rows: b n).
        let shape = decode_shape(
            c,
            self.plan.head_dim,
            q_heads,
            &self.state.compressed,
            &lengths,
            Some((counts, n)),
        );
        let [b, _, h, d] = q.dims();
        let out = self.attend_rows(q.reshape([b * n, h, d]), &shape)?;
        Ok(out.reshape([b, n, h, d]))
    }

    fn prefill_policy(&self) -> PrefillPolicy {
        self.config.prefill
    }

    fn lengths(&self) -> Vec<usize> {
        self.state
            .occupancy()
            .map(|o| o.compressed_tokens + o.window_tokens)
            .collect()
    }

    fn compressed_counts(&self) -> Vec<usize> {
        self.state.compressed.clone()
    }

    fn memory(&self) -> KvBytes {
        let shape = CacheShape {
            layers: 1,
            kv_heads: self.config.kv_heads,
            head_dim: self.plan.head_dim,
            value_type: self.config.value_type,
        };
        let occupancy: Vec<SequenceOccupancy> = self.state.occupancy().collect();
        kv_bytes(
            &shape,
            &occupancy,
            self.plan.k_sparsity,
            self.plan.v_sparsity,
        )
    }

    fn allocated_bytes(&self) -> usize {
        self.buffers.all().map(B::kv_buffer_bytes).sum()
    }
}

/// A dense KV cache for one layer with the same interface: every token stored as is.
pub struct DenseKvCache<B: SparseKvBackend> {
    config: KvCacheConfig,
    head_dim: HeadDim,
    device: B::Device,
    capacity: usize,
    k: B::KvBuffer,
    v: B::KvBuffer,
    lengths: Vec<usize>,
}

impl<B: SparseKvBackend> std::fmt::Debug for DenseKvCache<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DenseKvCache")
            .field("config", &self.config)
            .field("lengths", &self.lengths)
            .finish()
    }
}

impl<B: SparseKvBackend> DenseKvCache<B> {
    /// Attention of the query rows `q` `[rows, q_heads, head_dim]` as `shape` lays them out.
    fn attend_rows(&self, q: Tensor<B, 3>, shape: &DecodeShape) -> Result<Tensor<B, 3>> {
        let dense = DenseRows::<B> {
            k: self.k.clone(),
            v: self.v.clone(),
            capacity: self.capacity,
        };
        let out = B::kv_decode_attention(q.into_primitive().tensor(), None, &dense, shape)?;
        Ok(float(out))
    }

    /// Allocates a cache for `config` on `device` (window, chunk and sparsities are ignored);
    /// [`KvCacheError::DeviceMemory`] (nothing allocated) when the device cannot hold it.
    pub fn new(config: &KvCacheConfig, device: &B::Device) -> Result<Self> {
        device_ready()?;
        Self::allocate(config, config.dense_plan_on::<B>(1, device)?, device)
    }

    /// Allocates the buffers of `plan` (checked by the caller).
    fn allocate(
        config: &KvCacheConfig,
        DensePlan {
            head_dim,
            capacity,
            bytes,
        }: DensePlan,
        device: &B::Device,
    ) -> Result<Self> {
        Ok(DenseKvCache {
            config: config.clone(),
            head_dim,
            device: device.clone(),
            capacity,
            k: B::kv_alloc(device, bytes)?,
            v: B::kv_alloc(device, bytes)?,
            lengths: vec![0; config.batch],
        })
    }

    /// The configuration.
    pub fn config(&self) -> &KvCacheConfig {
        &self.config
    }

    /// Rows per stream of the K and V buffers.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The K and V buffers.
    pub(crate) fn buffers(&self) -> (&B::KvBuffer, &B::KvBuffer) {
        (&self.k, &self.v)
    }

    /// Where new rows go: the first `counts[s]` of the `rows` appended to sequence `s`, after
    /// its tokens.
    fn destination(&self, rows: usize, counts: &[usize]) -> RowCopy {
        RowCopy {
            sequences: self.config.batch,
            kv_heads: self.config.kv_heads,
            head_dim: self.head_dim,
            src_capacity: rows,
            dst_capacity: self.capacity,
            src_start: vec![0; self.config.batch],
            dst_start: to_u32(&self.lengths),
            counts: to_u32(counts),
        }
    }

    /// Counts the rows just appended.
    fn count_rows(&mut self, counts: &[usize]) {
        for (len, c) in self.lengths.iter_mut().zip(counts) {
            *len += c;
        }
    }
}

impl<B: SparseKvBackend> KvCache<B> for DenseKvCache<B> {
    fn append_ragged(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>, counts: &[usize]) -> Result<()> {
        check_append(&self.config, &self.device, &k, &v, counts, &self.lengths)?;
        let copy = self.destination(k.dims()[2], counts);
        let vt = self.config.value_type;
        B::kv_write_rows(
            &[
                (k.into_primitive().tensor(), &self.k),
                (v.into_primitive().tensor(), &self.v),
            ],
            vt,
            &copy,
        )?;
        self.count_rows(counts);
        Ok(())
    }

    fn append_qkv(
        &mut self,
        qkv: Tensor<B, 3>,
        rope: &RopeTables<B>,
        counts: &[usize],
    ) -> Result<Tensor<B, 4>> {
        let (c, lengths) = (&self.config, &self.lengths);
        one_launch_append(c, &self.device, (&qkv, rope), counts, lengths, true)?;
        let copy = self.destination(qkv.dims()[1], counts);
        let vt = self.config.value_type;
        let q = rope_into_rows(qkv, rope, &self.lengths, [&self.k, &self.v], vt, &copy)?;
        self.count_rows(counts);
        Ok(q)
    }

    fn attend(&self, q: Tensor<B, 3>) -> Result<Tensor<B, 3>> {
        let none = vec![0; self.config.batch];
        let c = &self.config;
        let shape = decode_rows(c, &self.device, self.head_dim, &none, &self.lengths, &q)?;
        self.attend_rows(q, &shape)
    }

    fn attend_newest(&self, q: Tensor<B, 4>, counts: &[usize]) -> Result<Tensor<B, 4>> {
        let none = vec![0; self.config.batch];
        let (c, hd) = (&self.config, self.head_dim);
        let (shape, [b, n, h, d]) =
            newest_rows(c, &self.device, hd, &none, &self.lengths, &q, counts)?;
        let out = self.attend_rows(q.reshape([b * n, h, d]), &shape)?;
        Ok(out.reshape([b, n, h, d]))
    }

    fn prefill_policy(&self) -> PrefillPolicy {
        self.config.prefill
    }

    fn lengths(&self) -> Vec<usize> {
        self.lengths.clone()
    }

    fn compressed_counts(&self) -> Vec<usize> {
        vec![0; self.lengths.len()]
    }

    fn memory(&self) -> KvBytes {
        let shape = CacheShape {
            layers: 1,
            kv_heads: self.config.kv_heads,
            head_dim: self.head_dim,
            value_type: self.config.value_type,
        };
        let occupancy: Vec<SequenceOccupancy> = self
            .lengths
            .iter()
            .map(|&t| SequenceOccupancy {
                compressed_tokens: 0,
                window_tokens: t,
            })
            .collect();
        kv_bytes(&shape, &occupancy, Sparsity::DENSE, Sparsity::DENSE)
    }

    fn allocated_bytes(&self) -> usize {
        B::kv_buffer_bytes(&self.k) + B::kv_buffer_bytes(&self.v)
    }
}

impl<B: SparseKvBackend> LayerCaches<SparseKvCache<B>> {
    /// The caches of a model's layers, all of `config`, checked together before any is
    /// allocated: [`KvCacheError::DeviceMemory`] when the device cannot hold all of them
    /// (where the runtime reports its memory: CUDA), instead of an allocation failure at a
    /// later layer. The layers share buffers in groups, and the window policy's compression
    /// runs for every layer of a group at once (the crate docs, "One cache for the whole
    /// model"); stream capacities are rounded up by at most 256 tokens for that.
    pub fn sparse(layers: usize, config: &KvCacheConfig, device: &B::Device) -> Result<Self> {
        device_ready()?;
        let plan = config.sparse_plan_on::<B>(layers, true, device)?;
        Ok(LayerCaches {
            layers: SparseKvCache::grouped(layers, config, plan, device)?,
        })
    }
}

impl<B: SparseKvBackend> LayerCaches<DenseKvCache<B>> {
    /// [`LayerCaches::sparse`] for dense caches.
    pub fn dense(layers: usize, config: &KvCacheConfig, device: &B::Device) -> Result<Self> {
        device_ready()?;
        let plan = config.dense_plan_on::<B>(layers, device)?;
        LayerCaches::new(layers, |_| DenseKvCache::allocate(config, plan, device))
    }
}

/// The most bytes of one buffer shared by a group of layers' caches.
const GROUP_BYTES_LIMIT: u64 = 1 << 31;

/// `layers` x `bytes`, or an error when that passes `u64`.
fn total_bytes(layers: usize, bytes: u64) -> Result<u64> {
    (layers as u64).checked_mul(bytes).ok_or_else(|| {
        KvCacheError::Invalid(format!(
            "{layers} layers of {bytes} bytes need more bytes than this machine can address"
        ))
    })
}

/// One cache per decoder layer, with totals.
#[derive(Debug)]
pub struct LayerCaches<C> {
    layers: Vec<C>,
}

impl<C> LayerCaches<C> {
    /// Builds `layers` caches with `make(layer)`.
    pub fn new<E>(
        layers: usize,
        make: impl FnMut(usize) -> std::result::Result<C, E>,
    ) -> std::result::Result<Self, E> {
        Ok(LayerCaches {
            layers: (0..layers)
                .map(make)
                .collect::<std::result::Result<_, _>>()?,
        })
    }

    /// The layers' caches, as the model's prefill and decode take them.
    pub fn layers_mut(&mut self) -> &mut [C] {
        &mut self.layers
    }

    /// The caches, one per layer.
    pub fn into_layers(self) -> Vec<C> {
        self.layers
    }

    /// The cache of layer `i`, if it exists.
    pub fn layer_mut(&mut self, i: usize) -> Option<&mut C> {
        self.layers.get_mut(i)
    }

    /// All layers.
    pub fn layers(&self) -> &[C] {
        &self.layers
    }

    /// Bytes in use over all layers.
    pub fn memory<B: SparseKvBackend>(&self) -> KvBytes
    where
        C: KvCache<B>,
    {
        self.layers
            .iter()
            .map(|c| c.memory())
            .fold(KvBytes::default(), |a, b| a + b)
    }
}
