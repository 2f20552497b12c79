//! The backend extension: the operations a KV cache needs, as a trait extending Burn's
//! `Backend` (Burn's backend-extension pattern), implemented once for `CubeBackend` over any
//! CubeCL runtime ([`cube`]: CUDA and wgpu from one implementation) and once for Burn's
//! `Fusion<B>` over any such backend ([`fusion`]: what `burn::backend::Wgpu` and
//! `burn::backend::Cuda` are with Burn's default features).
//!
//! The caches own raw device buffers ([`SparseKvBackend::KvBuffer`]): compressed streams are
//! bit strings and packed values, not tensors. Queries, keys and values enter and the
//! attention output leaves as ordinary Burn float tensors.
//!
//! Both implementations check their operands with the functions below (shapes and types are
//! known before anything runs, also in a fusion stream), so both refuse the same inputs with
//! the same typed errors.

pub mod cube;
pub mod fusion;

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, TensorMetadata};
use sparsekv_format::{HeadDim, PromptShape, Sparsity, ValueType};
use sparsekv_kernels::{CopyRowsArgs, RopeShape, RopeStyle, SkinnyInput, SkinnyShape};

use crate::error::{KvCacheError, Result};

pub use cube::CubeKvBuffer;

/// Rows moved per sequence between stream buffers `[streams, capacity, head_dim]` (see
/// [`SparseKvBackend::kv_copy_rows`], [`SparseKvBackend::kv_write_rows`] and
/// [`SparseKvBackend::kv_prune_compress`]). It owns its offsets, so a fusion stream can keep it
/// until the operation runs.
#[derive(Debug, Clone, PartialEq)]
pub struct RowCopy {
    /// Sequences in the batch.
    pub sequences: usize,
    /// KV heads per sequence.
    pub kv_heads: usize,
    /// Elements per row.
    pub head_dim: HeadDim,
    /// Rows per stream of the source.
    pub src_capacity: usize,
    /// Rows (tokens) per stream of the destination.
    pub dst_capacity: usize,
    /// First source row per sequence.
    pub src_start: Vec<u32>,
    /// First destination row per sequence.
    pub dst_start: Vec<u32>,
    /// Rows to copy per sequence.
    pub counts: Vec<u32>,
}

/// A compressed segment: K and V bitmaps and packed values (docs/FORMAT.md layout). Buffers
/// are shared handles: cloning one does not copy device memory.
#[derive(Debug, Clone)]
pub struct Segment<B: SparseKvBackend> {
    /// K bitmap words.
    pub k_bitmap: B::KvBuffer,
    /// K packed values.
    pub k_values: B::KvBuffer,
    /// V bitmap words.
    pub v_bitmap: B::KvBuffer,
    /// V packed values.
    pub v_values: B::KvBuffer,
    /// Token capacity of each stream.
    pub capacity: usize,
    /// Key sparsity.
    pub k_sparsity: Sparsity,
    /// Value sparsity.
    pub v_sparsity: Sparsity,
}

impl<B: SparseKvBackend> Segment<B> {
    /// The same segment for another backend type, each buffer mapped by `buffer` (a fused
    /// backend's buffers to those of the backend it wraps).
    pub fn map_buffers<C: SparseKvBackend>(
        &self,
        buffer: impl Fn(&B::KvBuffer) -> C::KvBuffer,
    ) -> Segment<C> {
        Segment {
            k_bitmap: buffer(&self.k_bitmap),
            k_values: buffer(&self.k_values),
            v_bitmap: buffer(&self.v_bitmap),
            v_values: buffer(&self.v_values),
            capacity: self.capacity,
            k_sparsity: self.k_sparsity,
            v_sparsity: self.v_sparsity,
        }
    }
}

/// Dense K and V rows: `[streams, capacity, head_dim]`.
#[derive(Debug, Clone)]
pub struct DenseRows<B: SparseKvBackend> {
    /// Keys.
    pub k: B::KvBuffer,
    /// Values.
    pub v: B::KvBuffer,
    /// Token capacity of each stream.
    pub capacity: usize,
}

impl<B: SparseKvBackend> DenseRows<B> {
    /// The same rows for another backend type, each buffer mapped by `buffer`.
    pub fn map_buffers<C: SparseKvBackend>(
        &self,
        buffer: impl Fn(&B::KvBuffer) -> C::KvBuffer,
    ) -> DenseRows<C> {
        DenseRows {
            k: buffer(&self.k),
            v: buffer(&self.v),
            capacity: self.capacity,
        }
    }
}

/// The shape of one decode-attention call: one query row per entry of the length vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeShape {
    /// Query heads.
    pub q_heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: HeadDim,
    /// Compressed tokens per sequence.
    pub compressed_lens: Vec<u32>,
    /// Dense tokens per sequence (after the compressed ones).
    pub dense_lens: Vec<u32>,
    /// The cache sequence each query row reads (`0, 1, ..` in decode; a prompt chunk's rows
    /// repeat their sequence, each with its own lengths above).
    pub row_sequences: Vec<u32>,
}

/// The dense copy of a sparse cache's tokens that [`SparseKvBackend::kv_expand_context`]
/// makes: per sequence its compressed tokens then its window tokens, in streams of `context`
/// rows.
#[derive(Debug, Clone, PartialEq)]
pub struct ContextLayout {
    /// KV heads.
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: HeadDim,
    /// The cache's value type (and the result's).
    pub value_type: ValueType,
    /// Compressed tokens per sequence.
    pub compressed_lens: Vec<u32>,
    /// Dense (window) tokens per sequence, after the compressed ones.
    pub dense_lens: Vec<u32>,
    /// Rows per stream of the result, at least every sequence's tokens.
    pub context: usize,
}

impl ContextLayout {
    /// The shape of each result: `[sequences, kv_heads, context, head_dim]`.
    pub fn dims(&self) -> Vec<usize> {
        vec![
            self.compressed_lens.len(),
            self.kv_heads,
            self.context,
            self.head_dim.get(),
        ]
    }
}

/// Compressed streams that prune+compress writes: bitmap words and packed values, pruned at
/// `sparsity` (see [`SparseKvBackend::kv_prune_compress`]).
#[derive(Debug, Clone)]
pub struct CompressedStreams<B: SparseKvBackend> {
    /// Destination bitmap words.
    pub bitmap: B::KvBuffer,
    /// Destination packed values.
    pub values: B::KvBuffer,
    /// Sparsity to prune at.
    pub sparsity: Sparsity,
}

impl<B: SparseKvBackend> CompressedStreams<B> {
    /// The same streams for another backend type, each buffer mapped by `buffer`.
    pub fn map_buffers<C: SparseKvBackend>(
        &self,
        buffer: impl Fn(&B::KvBuffer) -> C::KvBuffer,
    ) -> CompressedStreams<C> {
        CompressedStreams {
            bitmap: buffer(&self.bitmap),
            values: buffer(&self.values),
            sparsity: self.sparsity,
        }
    }
}

/// Where prune+compress reads and writes: dense source rows `[streams, src_capacity,
/// head_dim]` and the streams they go to.
#[derive(Debug, Clone)]
pub struct CompressTarget<B: SparseKvBackend> {
    /// Dense source rows.
    pub src: B::KvBuffer,
    /// Where they go.
    pub dest: CompressedStreams<B>,
}

impl<B: SparseKvBackend> CompressTarget<B> {
    /// The same target for another backend type, each buffer mapped by `buffer`.
    pub fn map_buffers<C: SparseKvBackend>(
        &self,
        buffer: impl Fn(&B::KvBuffer) -> C::KvBuffer,
    ) -> CompressTarget<C> {
        CompressTarget {
            src: buffer(&self.src),
            dest: self.dest.map_buffers::<C>(buffer),
        }
    }
}

/// Alignment, in bytes, of the offset of a [`SparseKvBackend::kv_view`]: wgpu binds storage
/// buffers at offsets of its `min_storage_buffer_offset_alignment`, which is at most 256 on
/// every adapter (WebGPU's default limit).
pub const KV_VIEW_ALIGNMENT: usize = 256;

/// The most activation rows [`SparseKvBackend::skinny_matmul`] takes.
pub const SKINNY_MAX_ROWS: usize = sparsekv_kernels::skinny::MAX_M;

/// Device memory as the runtime reports it, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    /// What can still be allocated: the driver's free memory plus what the runtime's memory
    /// pools hold reserved but unused (CubeCL keeps freed buffers for reuse).
    pub available: u64,
    /// The device's total memory.
    pub total: u64,
}

/// A Burn backend that can run sparse KV caches.
pub trait SparseKvBackend: Backend {
    /// A device buffer owned by a cache.
    type KvBuffer: Clone + Send + Sync + std::fmt::Debug;

    /// Allocates `bytes` bytes on `device` (contents unspecified); a typed error when the
    /// device cannot allocate a buffer that large in one piece.
    fn kv_alloc(device: &Self::Device, bytes: usize) -> Result<Self::KvBuffer>;

    /// Size of a buffer in bytes.
    fn kv_buffer_bytes(buffer: &Self::KvBuffer) -> usize;

    /// The `bytes` bytes of `buffer` from byte `offset` as a buffer of their own, sharing its
    /// memory (nothing is copied; operations on the view and on the whole are ordered alike).
    /// `offset` must be a multiple of [`KV_VIEW_ALIGNMENT`] (the binding-offset alignment
    /// that every runtime accepts); a typed error when it is not or when the range passes the
    /// buffer's end.
    fn kv_view(buffer: &Self::KvBuffer, offset: usize, bytes: usize) -> Result<Self::KvBuffer>;

    /// The largest buffer `device` allocates in one piece, in bytes (on wgpu the adapter's
    /// storage-buffer limit, on CUDA a share of device memory). Anything larger fails inside
    /// the runtime, so callers compare against it before allocating.
    fn max_buffer_bytes(device: &Self::Device) -> u64;

    /// What `device` can still allocate, where the runtime can tell (CUDA); `None` where it
    /// cannot (wgpu reports no memory size). The caches check their bytes against it before
    /// allocating anything.
    fn device_memory(device: &Self::Device) -> Option<DeviceMemory>;

    /// Runs `make` (which creates long-lived buffers: a model's weights) with the device's
    /// allocator in persistent mode where the backend has one: on `CubeBackend` each buffer
    /// made meanwhile gets memory of exactly its size, instead of a slice of a pooled page
    /// whose unused tail stays reserved (Llama-3-8B's random weights: 16.07 GB in use,
    /// 20.03 GB reserved). Elsewhere (the fused backend, whose operations run later) it just
    /// runs `make`.
    fn persistent_memory<T: Send>(
        device: &Self::Device,
        make: impl FnOnce() -> T + Send,
    ) -> Result<T> {
        let _ = device;
        Ok(make())
    }

    /// The value type of a float tensor, if the caches support it (f32, f16, bf16).
    fn kv_value_type(tensor: &FloatTensor<Self>) -> Result<ValueType> {
        Operand::of(tensor).value_type("tensor")
    }

    /// Writes token rows of each tensor (`[sequences, kv_heads, n, head_dim]`; sequence `s` uses
    /// its `copy.counts[s]` rows from `copy.src_start[s]`) into its buffer at `copy.dst_start`:
    /// one or two (rows, buffer) pairs (a cache's keys and values), in one launch.
    fn kv_write_rows(
        pairs: &[(FloatTensor<Self>, &Self::KvBuffer)],
        value_type: ValueType,
        copy: &RowCopy,
    ) -> Result<()>;

    /// Copies rows from each source buffer to its (distinct) destination: one or two
    /// (source, destination) pairs, in one launch.
    fn kv_copy_rows(
        device: &Self::Device,
        pairs: &[(&Self::KvBuffer, &Self::KvBuffer)],
        value_type: ValueType,
        copy: &RowCopy,
    ) -> Result<()>;

    /// Prunes rows `rows.src_start[s] ..` (`rows.counts[s]` of them) of every stream of
    /// sequence `s` of each target's `src` and writes them compressed as tokens
    /// `rows.dst_start[s] ..` of its destination streams (`rows.dst_capacity` tokens each).
    /// One or two targets (a cache's keys and values, each at its own sparsity), in one
    /// launch.
    fn kv_prune_compress(
        device: &Self::Device,
        targets: &[CompressTarget<Self>],
        value_type: ValueType,
        rows: &RowCopy,
    ) -> Result<()>;

    /// Prunes token rows of tensors `[sequences, kv_heads, n, head_dim]` (sequence `s`: its
    /// `rows.counts[s]` rows from `rows.src_start[s]`; `rows.src_capacity` is `n`) and writes
    /// them compressed as tokens `rows.dst_start[s] ..` of their streams (`rows.dst_capacity`
    /// tokens per stream): a prompt's tokens go straight into the compressed streams without
    /// passing through the dense window. One or two sources (keys and values), one launch.
    fn kv_compress_rows(
        sources: Vec<(FloatTensor<Self>, CompressedStreams<Self>)>,
        value_type: ValueType,
        rows: &RowCopy,
    ) -> Result<()>;

    /// Decode attention for queries `[sequences, q_heads, head_dim]` over an optional
    /// compressed segment followed by dense rows; returns `[sequences, q_heads, head_dim]`.
    fn kv_decode_attention(
        q: FloatTensor<Self>,
        segment: Option<&Segment<Self>>,
        dense: &DenseRows<Self>,
        shape: &DecodeShape,
    ) -> Result<FloatTensor<Self>>;

    /// The projection of a decode step, `a · wᵀ`: `x` holds the activations of `m` rows (one
    /// per sequence, `m` at most [`SKINNY_MAX_ROWS`]) and `w` the weights as `[n, k]` rows
    /// (PyTorch's `nn.Linear` layout), all of one float type; returns `[m, n]`. `input` says
    /// what `a` is: `x` `[m, k]` itself ([`SkinnyInput::Plain`]), the RMSNorm of `x` `[m, k]`
    /// with a `[k]` weight ([`SkinnyInput::RmsNorm`]), or `silu(gate) · up` of `x` `[m, 2k]`
    /// holding the gate then the up projection ([`SkinnyInput::SwiGlu`]); the last two take no
    /// launch of their own where the CUDA-core kernel runs (see [`SkinnyInput`]). The weights
    /// are streamed once at memory bandwidth (the skinny-matmul kernel), where a general
    /// matmul would tile for reuse that a few rows do not have. With a `residual` `[m, n]`
    /// (same type) the result is `residual + a · wᵀ`, in the same launch.
    fn skinny_matmul(
        x: FloatTensor<Self>,
        input: SkinnyInput<FloatTensor<Self>>,
        w: FloatTensor<Self>,
        residual: Option<FloatTensor<Self>>,
    ) -> Result<FloatTensor<Self>>;

    /// `x · wᵀ`, with `residual` added when given, for activations of any number of rows (a
    /// prompt's): `x` `[m, k]`, `w` `[n, k]` (`nn.Linear` layout), `residual` `[m, n]`, one
    /// float type; returns `[m, n]`. `CubeBackend` runs 16-bit operands on cubek's
    /// warp-specialised TMA kernel where the device has one (Hopper; about 3x Burn's default
    /// matmul at a Llama-3-8B prefill's shapes), else on Burn's matmul.
    fn prompt_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        residual: Option<FloatTensor<Self>>,
    ) -> Result<FloatTensor<Self>>;

    /// RMSNorm over the last axis in one launch: `x / sqrt(mean(x²) + eps) · weight`, computed
    /// in f32 without overflow for 16-bit inputs; `weight` has the length of that axis and the
    /// type of `x`. Returns a tensor of the shape and type of `x`.
    fn rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> Result<FloatTensor<Self>>;

    /// Splits the output of a fused QKV projection, `qkv` `[b, n, (q_heads + 2 kv_heads) ·
    /// head_dim]`, into queries `[b, n, q_heads, head_dim]`, keys and values
    /// `[b, kv_heads, n, head_dim]` (the caches' layout), rotating queries and keys in one
    /// launch: the angles' cosines and sines are the model's tables `cos`, `sin`
    /// `[positions, head_dim / 2]`, and token `t` of sequence `s` sits at position
    /// `starts[s] + t` (`b` starts; a decode step passes each sequence's length, a prompt chunk
    /// its first position).
    fn rope_split(
        qkv: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        starts: &[usize],
        heads: RopeHeads,
    ) -> Result<[FloatTensor<Self>; 3]>;

    /// [`Self::rope_split`] whose keys and values go straight into a cache's dense rows instead
    /// of tensors of their own, in the same launch (a decode step appends without a copy):
    /// `window` holds the keys' and the values' buffer (`copy.dst_capacity` rows per stream,
    /// of `value_type`, which `qkv` must have), and sequence `s` writes its tokens
    /// `copy.src_start[s] ..` (`copy.counts[s]` of them; `copy.src_capacity` is the tokens of
    /// `qkv`) at rows `copy.dst_start[s] ..` of its streams. Returns the queries
    /// `[b, n, q_heads, head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn rope_append(
        qkv: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        starts: &[usize],
        heads: RopeHeads,
        window: [&Self::KvBuffer; 2],
        value_type: ValueType,
        copy: &RowCopy,
    ) -> Result<FloatTensor<Self>>;

    /// SwiGLU in one launch: `gate_up` `[.., 2 * hidden]` holds the gate then the up
    /// projection on its last axis; returns `silu(gate) · up`, `[.., hidden]`, computed in f32.
    fn swiglu(gate_up: FloatTensor<Self>) -> Result<FloatTensor<Self>>;

    /// Every token of a sparse cache as dense rows, for the attention of a prompt chunk that
    /// went into the cache ([`Self::prompt_attention`] with the chunk's past): keys and values
    /// `[sequences, kv_heads, context, head_dim]`, each stream its compressed tokens expanded
    /// (pruned elements zero, docs/FORMAT.md), then its window rows, then zero rows up to
    /// `layout.context`. A transient of one layer's dense context, written in one launch per
    /// tensor.
    fn kv_expand_context(
        device: &Self::Device,
        segment: &Segment<Self>,
        window: &DenseRows<Self>,
        layout: &ContextLayout,
    ) -> Result<[FloatTensor<Self>; 2]>;

    /// Why [`Self::prompt_attention`] has no kernel for prompts of `value_type` and `shape` on
    /// `device`, or `None` when it has one. A caller without one computes the attention
    /// another way (the Llama model: blocks of queries through Burn's matmul and softmax).
    /// `CubeBackend` has one on CUDA for f16 and bf16 at head_dims that are multiples of 16 up
    /// to 128.
    fn prompt_attention_unsupported(
        device: &Self::Device,
        value_type: ValueType,
        shape: PromptShape,
    ) -> Option<String>;

    /// Causal self-attention of prompts in one launch, flash-style (no `tokens x context`
    /// scores in memory; each KV head's keys and values read for its whole query group, never
    /// repeated): `q` `[batch, tokens, q_heads, head_dim]`, `k` and `v`
    /// `[batch, kv_heads, context, head_dim]` with `context >= tokens`, one float type;
    /// returns `[batch, tokens, q_heads, head_dim]`. The queries are the last `tokens` of
    /// the context (a whole prompt when `context == tokens`, else a chunk after
    /// `past = context - tokens` earlier tokens): query `t` sees keys `0..=past + t`, scores
    /// scaled by `1 / sqrt(head_dim)`, accumulated in f32. Where
    /// [`Self::prompt_attention_unsupported`] gives a reason, the call is the typed error
    /// `KvCacheError::Kernel(KernelError::Unsupported(..))`.
    fn prompt_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> Result<FloatTensor<Self>>;
}

/// The heads of [`SparseKvBackend::rope_split`] and how their channels pair up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeHeads {
    /// Query heads.
    pub q_heads: usize,
    /// Key and value heads.
    pub kv_heads: usize,
    /// Channel pairing.
    pub style: RopeStyle,
}

/// The shape and type of a tensor operand, read before an operation runs.
#[derive(Debug, Clone, PartialEq)]
struct Operand {
    dims: Vec<usize>,
    dtype: DType,
}

impl Operand {
    /// The shape and type of `tensor` (any backend's tensor primitive).
    fn of<T: TensorMetadata>(tensor: &T) -> Self {
        Operand {
            dims: tensor.shape().to_vec(),
            dtype: tensor.dtype(),
        }
    }

    /// The value type of a tensor the caches take (f32, f16, bf16), else a typed error.
    fn value_type(&self, what: &'static str) -> Result<ValueType> {
        match self.dtype {
            DType::F32 => Ok(ValueType::F32),
            DType::F16 => Ok(ValueType::F16),
            DType::BF16 => Ok(ValueType::BF16),
            other => Err(KvCacheError::DType {
                what,
                expected: "f32, f16 or bf16",
                actual: other,
            }),
        }
    }

    /// A typed error unless this operand holds `value_type` (one that must match the others).
    fn expect_type(&self, what: &'static str, value_type: ValueType) -> Result<()> {
        if self.dtype == value_dtype(value_type) {
            Ok(())
        } else {
            Err(KvCacheError::DType {
                what,
                expected: value_type.name(),
                actual: self.dtype,
            })
        }
    }
}

/// Burn's type for a value type.
pub(crate) fn value_dtype(value_type: ValueType) -> DType {
    match value_type {
        ValueType::F32 => DType::F32,
        ValueType::F16 => DType::F16,
        ValueType::BF16 => DType::BF16,
    }
}

/// Checks the row tensors of [`SparseKvBackend::kv_write_rows`] against the cache's type.
pub(crate) fn check_rows<'a, T: TensorMetadata + 'a>(
    rows: impl IntoIterator<Item = &'a T>,
    value_type: ValueType,
) -> Result<()> {
    rows.into_iter()
        .try_for_each(|r| Operand::of(r).expect_type("rows", value_type))
}

/// Checks the queries of [`SparseKvBackend::kv_decode_attention`]; returns their value type
/// and the output's shape `[sequences, q_heads, head_dim]`.
pub(crate) fn decode_output<T: TensorMetadata>(
    q: &T,
    shape: &DecodeShape,
) -> Result<(ValueType, Vec<usize>)> {
    let q = &Operand::of(q);
    let value_type = q.value_type("queries")?;
    let expected = vec![
        shape.compressed_lens.len(),
        shape.q_heads,
        shape.head_dim.get(),
    ];
    if q.dims != expected {
        return Err(KvCacheError::Shape {
            what: "queries",
            expected,
            actual: q.dims.clone(),
        });
    }
    if shape.dense_lens.len() != expected[0] || shape.row_sequences.len() != expected[0] {
        return Err(KvCacheError::Invalid(format!(
            "{} compressed lengths, {} dense lengths and {} row sequences for {} query rows",
            expected[0],
            shape.dense_lens.len(),
            shape.row_sequences.len(),
            expected[0]
        )));
    }
    Ok((value_type, expected))
}

/// Checks the operands of [`SparseKvBackend::skinny_matmul`]; returns the value type and the
/// product's shape.
pub(crate) fn skinny_plan<T: TensorMetadata>(
    x: &T,
    input: &SkinnyInput<T>,
    w: &T,
    residual: Option<&T>,
) -> Result<(ValueType, SkinnyShape)> {
    let mut xo = Operand::of(x);
    if let SkinnyInput::SwiGlu = input {
        // The product's activations are [m, k] of the [m, 2k] gate and up halves.
        match xo.dims.as_mut_slice() {
            [_, two_k] if *two_k % 2 == 0 => *two_k /= 2,
            _ => {
                return Err(KvCacheError::Shape {
                    what: "SwiGLU projection activations (the gate then the up half, [m, 2k])",
                    expected: vec![0, 0],
                    actual: xo.dims,
                });
            }
        }
    }
    let (value_type, shape) =
        projection_operands(&xo, &Operand::of(w), residual.map(Operand::of).as_ref())?;
    if let SkinnyInput::RmsNorm { weight, eps } = input {
        let weight = Operand::of(weight);
        weight.expect_type("RMSNorm weights", value_type)?;
        if weight.dims != [shape.k] {
            return Err(KvCacheError::Shape {
                what: "RMSNorm weights",
                expected: vec![shape.k],
                actual: weight.dims,
            });
        }
        if !(eps.is_finite() && *eps >= 0.0) {
            return Err(KvCacheError::Invalid(format!(
                "RMSNorm eps {eps}: needs a finite eps >= 0"
            )));
        }
    }
    if shape.m > SKINNY_MAX_ROWS {
        return Err(KvCacheError::Invalid(format!(
            "skinny matmul of [{}, {}] by [{}, {}]ᵀ: needs 1..={SKINNY_MAX_ROWS} activation rows",
            shape.m, shape.k, shape.n, shape.k
        )));
    }
    Ok((value_type, shape))
}

/// Checks the operands of a projection `x [m, k] · w [n, k]ᵀ (+ residual [m, n])`
/// ([`SparseKvBackend::skinny_matmul`], [`SparseKvBackend::prompt_matmul`]).
pub(crate) fn projection_plan<T: TensorMetadata>(
    x: &T,
    w: &T,
    residual: Option<&T>,
) -> Result<(ValueType, SkinnyShape)> {
    projection_operands(
        &Operand::of(x),
        &Operand::of(w),
        residual.map(Operand::of).as_ref(),
    )
}

/// [`projection_plan`] of the operands' shapes and types.
fn projection_operands(
    x: &Operand,
    w: &Operand,
    residual: Option<&Operand>,
) -> Result<(ValueType, SkinnyShape)> {
    let value_type = x.value_type("activations")?;
    w.expect_type("weights", value_type)?;
    if let Some(r) = residual {
        r.expect_type("residual", value_type)?;
    }
    let (&[m, k], &[n, wk]) = (x.dims.as_slice(), w.dims.as_slice()) else {
        return Err(KvCacheError::Shape {
            what: "projection operands (activations [m, k], weights [n, k])",
            expected: vec![0, 0],
            actual: if x.dims.len() == 2 {
                w.dims.clone()
            } else {
                x.dims.clone()
            },
        });
    };
    if wk != k {
        return Err(KvCacheError::Shape {
            what: "weights",
            expected: vec![0, k],
            actual: w.dims.clone(),
        });
    }
    if m == 0 || n == 0 || k == 0 {
        return Err(KvCacheError::Invalid(format!(
            "projection of [{m}, {k}] by [{n}, {k}]ᵀ: needs activation rows and non-empty weights"
        )));
    }
    if let Some(r) = residual
        && r.dims != [m, n]
    {
        return Err(KvCacheError::Shape {
            what: "residual",
            expected: vec![m, n],
            actual: r.dims.clone(),
        });
    }
    Ok((value_type, SkinnyShape { m, n, k }))
}

/// The rows and the normalised axis of an RMSNorm input.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NormPlan {
    pub(crate) value_type: ValueType,
    pub(crate) rows: usize,
    pub(crate) dim: usize,
    /// The output's shape (the input's).
    pub(crate) dims: Vec<usize>,
}

/// Checks the operands of [`SparseKvBackend::rms_norm`].
pub(crate) fn rms_norm_plan<T: TensorMetadata>(x: &T, weight: &T, eps: f64) -> Result<NormPlan> {
    let (x, weight) = (&Operand::of(x), &Operand::of(weight));
    let value_type = x.value_type("RMSNorm input")?;
    weight.expect_type("RMSNorm weights", value_type)?;
    let dim = x.dims.last().copied().unwrap_or(0);
    if dim == 0 || !(eps.is_finite() && eps >= 0.0) {
        return Err(KvCacheError::Invalid(format!(
            "RMSNorm over rows of {dim} elements with eps {eps}: needs non-empty rows and a finite eps >= 0"
        )));
    }
    if weight.dims != [dim] {
        return Err(KvCacheError::Shape {
            what: "RMSNorm weights",
            expected: vec![dim],
            actual: weight.dims.clone(),
        });
    }
    Ok(NormPlan {
        value_type,
        rows: x.dims.iter().product::<usize>() / dim.max(1),
        dim,
        dims: x.dims.clone(),
    })
}

/// Checks the operands of [`SparseKvBackend::rope_split`]; returns the value type and the
/// kernel's shape.
pub(crate) fn rope_plan<T: TensorMetadata>(
    qkv: &T,
    cos: &T,
    sin: &T,
    starts: &[usize],
    heads: RopeHeads,
) -> Result<(ValueType, RopeShape)> {
    let (qkv, cos, sin) = (&Operand::of(qkv), &Operand::of(cos), &Operand::of(sin));
    let value_type = qkv.value_type("fused QKV")?;
    cos.expect_type("RoPE cos", value_type)?;
    sin.expect_type("RoPE sin", value_type)?;
    let RopeHeads {
        q_heads, kv_heads, ..
    } = heads;
    let heads_total = q_heads + 2 * kv_heads;
    let &[b, n, width] = qkv.dims.as_slice() else {
        return Err(KvCacheError::Shape {
            what: "fused QKV",
            expected: vec![0, 0, 0],
            actual: qkv.dims.clone(),
        });
    };
    let d = width.checked_div(heads_total).unwrap_or(0);
    if d == 0 || d * heads_total != width || d % 2 != 0 || q_heads == 0 || kv_heads == 0 {
        return Err(KvCacheError::Invalid(format!(
            "fused QKV rows of {width} are not {q_heads} + 2 x {kv_heads} heads of an even head_dim"
        )));
    }
    let positions = cos.dims.first().copied().unwrap_or(0);
    for (what, t) in [("RoPE cos", cos), ("RoPE sin", sin)] {
        if t.dims != [positions, d / 2] {
            return Err(KvCacheError::Shape {
                what,
                expected: vec![positions, d / 2],
                actual: t.dims.clone(),
            });
        }
    }
    if starts.len() != b {
        return Err(KvCacheError::Invalid(format!(
            "RoPE of {b} sequences with {} start positions",
            starts.len()
        )));
    }
    if let Some(&s) = starts
        .iter()
        .find(|&&s| s.checked_add(n).is_none_or(|end| end > positions))
    {
        return Err(KvCacheError::Invalid(format!(
            "RoPE of {n} tokens from position {s}: the angle tables hold {positions} positions"
        )));
    }
    let shape = RopeShape {
        sequences: b,
        tokens: n,
        q_heads,
        kv_heads,
        head_dim: d,
        positions,
    };
    Ok((value_type, shape))
}

/// [`rope_plan`] for [`SparseKvBackend::rope_append`], whose `qkv` must also hold the cache's
/// `value_type`.
pub(crate) fn rope_append_plan<T: TensorMetadata>(
    qkv: &T,
    cos: &T,
    sin: &T,
    starts: &[usize],
    heads: RopeHeads,
    value_type: ValueType,
) -> Result<RopeShape> {
    Operand::of(qkv).expect_type("fused QKV", value_type)?;
    Ok(rope_plan(qkv, cos, sin, starts, heads)?.1)
}

/// The output shapes of [`SparseKvBackend::rope_split`]: queries `[b, n, q_heads, d]`, keys and
/// values `[b, kv_heads, n, d]`.
pub(crate) fn rope_output_dims(shape: &RopeShape) -> [Vec<usize>; 3] {
    let RopeShape {
        sequences: b,
        tokens: n,
        q_heads,
        kv_heads,
        head_dim: d,
        ..
    } = *shape;
    [
        vec![b, n, q_heads, d],
        vec![b, kv_heads, n, d],
        vec![b, kv_heads, n, d],
    ]
}

/// Checks the input of [`SparseKvBackend::swiglu`]; `dim` of the plan is the hidden width and
/// `dims` the output's shape.
pub(crate) fn swiglu_plan<T: TensorMetadata>(gate_up: &T) -> Result<NormPlan> {
    let gate_up = &Operand::of(gate_up);
    let value_type = gate_up.value_type("SwiGLU input")?;
    let mut dims = gate_up.dims.clone();
    let width = dims.last().copied().unwrap_or(0);
    if width % 2 != 0 {
        return Err(KvCacheError::Invalid(format!(
            "SwiGLU input rows of {width} are not a gate and an up half"
        )));
    }
    let rows = dims.iter().product::<usize>() / width.max(1);
    if let Some(last) = dims.last_mut() {
        *last = width / 2;
    }
    Ok(NormPlan {
        value_type,
        rows,
        dim: width / 2,
        dims,
    })
}

/// The operands of [`SparseKvBackend::prompt_attention`], checked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PromptPlan {
    pub value_type: ValueType,
    pub shape: PromptShape,
    /// Output dimensions: those of the queries.
    pub dims: Vec<usize>,
}

/// Checks the operands of [`SparseKvBackend::prompt_attention`].
pub(crate) fn prompt_plan<T: TensorMetadata>(q: &T, k: &T, v: &T) -> Result<PromptPlan> {
    let (q, k, v) = (&Operand::of(q), &Operand::of(k), &Operand::of(v));
    let value_type = q.value_type("prompt queries")?;
    k.expect_type("prompt keys", value_type)?;
    v.expect_type("prompt values", value_type)?;
    let &[batch, tokens, q_heads, d] = q.dims.as_slice() else {
        return Err(KvCacheError::Invalid(format!(
            "prompt queries of shape {:?}: expected [batch, tokens, q_heads, head_dim]",
            q.dims
        )));
    };
    let kv_heads = k.dims.get(1).copied().unwrap_or(0);
    // The queries are the context's last `tokens`.
    let context = k.dims.get(2).copied().unwrap_or(0).max(tokens);
    let kv_dims = vec![batch, kv_heads, context, d];
    for (what, x) in [("prompt keys", k), ("prompt values", v)] {
        if x.dims != kv_dims {
            return Err(KvCacheError::Shape {
                what,
                expected: kv_dims.clone(),
                actual: x.dims.clone(),
            });
        }
    }
    let shape = PromptShape::new(batch, tokens, q_heads, kv_heads, HeadDim::new(d)?)?
        .with_past(context - tokens)?;
    Ok(PromptPlan {
        value_type,
        shape,
        dims: q.dims.clone(),
    })
}

/// The kernels' arguments of a [`RowCopy`].
pub(crate) fn row_args(copy: &RowCopy) -> CopyRowsArgs<'_> {
    CopyRowsArgs {
        sequences: copy.sequences,
        kv_heads: copy.kv_heads,
        head_dim: copy.head_dim.get(),
        src_capacity: copy.src_capacity,
        dst_capacity: copy.dst_capacity,
        src_start: &copy.src_start,
        dst_start: &copy.dst_start,
        counts: &copy.counts,
    }
}

/// Checks the range of a [`SparseKvBackend::kv_view`] of a buffer of `total` bytes.
pub(crate) fn check_view(total: usize, offset: usize, bytes: usize) -> Result<()> {
    if !offset.is_multiple_of(KV_VIEW_ALIGNMENT)
        || offset.checked_add(bytes).is_none_or(|end| end > total)
    {
        return Err(KvCacheError::Invalid(format!(
            "a view of {bytes} bytes at byte {offset} of a {total}-byte buffer must lie inside it and start at a multiple of {KV_VIEW_ALIGNMENT}"
        )));
    }
    Ok(())
}
