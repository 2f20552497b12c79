//! The backend extension: the operations a KV cache needs, as a trait extending Burn's
//! `Backend` (Burn's backend-extension pattern), implemented once for `CubeBackend` over any
//! CubeCL runtime, so CUDA and wgpu come from one implementation.
//!
//! The caches own raw device buffers ([`SparseKvBackend::KvBuffer`]): compressed streams are
//! bit strings and packed values, not tensors. Queries, keys and values enter and the
//! attention output leaves as ordinary Burn float tensors.

use burn::tensor::DType;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use sparsekv_format::{HeadDim, Sparsity, ValueType};
use sparsekv_kernels::cubecl::server::Handle;
use sparsekv_kernels::{
    AttentionArgs, CompressArgs, CopyRowsArgs, DenseCacheArgs, RopeShape, RopeStyle, SkinnyShape,
    SparseSegmentArgs,
};

use crate::error::{KvCacheError, Result};

/// Per-sequence row copy between dense stream buffers (see [`SparseKvBackend::kv_copy_rows`]).
#[derive(Debug, Clone)]
pub struct RowCopy<'a> {
    /// Sequences in the batch.
    pub sequences: usize,
    /// KV heads per sequence.
    pub kv_heads: usize,
    /// Elements per row.
    pub head_dim: HeadDim,
    /// Rows per stream of the source.
    pub src_capacity: usize,
    /// Rows per stream of the destination.
    pub dst_capacity: usize,
    /// First source row per sequence.
    pub src_start: &'a [u32],
    /// First destination row per sequence.
    pub dst_start: &'a [u32],
    /// Rows to copy per sequence.
    pub counts: &'a [u32],
}

/// A compressed segment: K and V bitmaps and packed values (docs/FORMAT.md layout).
#[derive(Debug, Clone)]
pub struct SegmentRef<'a, B: SparseKvBackend> {
    /// K bitmap words.
    pub k_bitmap: &'a B::KvBuffer,
    /// K packed values.
    pub k_values: &'a B::KvBuffer,
    /// V bitmap words.
    pub v_bitmap: &'a B::KvBuffer,
    /// V packed values.
    pub v_values: &'a B::KvBuffer,
    /// Token capacity of each stream.
    pub capacity: usize,
    /// Key sparsity.
    pub k_sparsity: Sparsity,
    /// Value sparsity.
    pub v_sparsity: Sparsity,
}

/// Dense K and V rows: `[streams, capacity, head_dim]`.
#[derive(Debug, Clone)]
pub struct DenseRef<'a, B: SparseKvBackend> {
    /// Keys.
    pub k: &'a B::KvBuffer,
    /// Values.
    pub v: &'a B::KvBuffer,
    /// Token capacity of each stream.
    pub capacity: usize,
}

/// The shape of one decode-attention call.
#[derive(Debug, Clone)]
pub struct DecodeShape<'a> {
    /// Query heads.
    pub q_heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: HeadDim,
    /// Compressed tokens per sequence.
    pub compressed_lens: &'a [u32],
    /// Dense tokens per sequence (after the compressed ones).
    pub dense_lens: &'a [u32],
}

/// Where prune+compress reads and writes (see [`SparseKvBackend::kv_prune_compress`]).
#[derive(Debug, Clone)]
pub struct CompressRef<'a, B: SparseKvBackend> {
    /// Dense source rows, `[streams, src_capacity, head_dim]`.
    pub src: &'a B::KvBuffer,
    /// Rows per source stream.
    pub src_capacity: usize,
    /// Destination bitmap words.
    pub bitmap: &'a B::KvBuffer,
    /// Destination packed values.
    pub values: &'a B::KvBuffer,
    /// Token capacity of each destination stream.
    pub capacity: usize,
    /// Sparsity to prune at.
    pub sparsity: Sparsity,
}

/// The most activation rows [`SparseKvBackend::skinny_matmul`] takes.
pub const SKINNY_MAX_ROWS: usize = sparsekv_kernels::skinny::MAX_M;

/// A Burn backend that can run sparse KV caches.
pub trait SparseKvBackend: Backend {
    /// A device buffer owned by a cache.
    type KvBuffer: Clone + Send + Sync + std::fmt::Debug;

    /// Allocates `bytes` bytes on `device` (contents unspecified); a typed error when the
    /// device cannot allocate a buffer that large in one piece.
    fn kv_alloc(device: &Self::Device, bytes: usize) -> Result<Self::KvBuffer>;

    /// Size of a buffer in bytes.
    fn kv_buffer_bytes(buffer: &Self::KvBuffer) -> usize;

    /// The largest buffer `device` allocates in one piece, in bytes (on wgpu the adapter's
    /// storage-buffer limit, on CUDA a share of device memory). Anything larger fails inside
    /// the runtime, so callers compare against it before allocating.
    fn max_buffer_bytes(device: &Self::Device) -> u64;

    /// The value type of a float tensor, if the caches support it (f32, f16, bf16).
    fn kv_value_type(tensor: &FloatTensor<Self>) -> Result<ValueType>;

    /// Writes token rows of each tensor (`[sequences, kv_heads, n, head_dim]`; sequence `s` uses
    /// its `copy.counts[s]` rows from `copy.src_start[s]`) into its buffer at `copy.dst_start`:
    /// one or two (rows, buffer) pairs (a cache's keys and values), in one launch.
    fn kv_write_rows(
        pairs: &[(FloatTensor<Self>, &Self::KvBuffer)],
        value_type: ValueType,
        copy: &RowCopy<'_>,
    ) -> Result<()>;

    /// Copies rows from each source buffer to its (distinct) destination: one or two
    /// (source, destination) pairs, in one launch.
    fn kv_copy_rows(
        device: &Self::Device,
        pairs: &[(&Self::KvBuffer, &Self::KvBuffer)],
        value_type: ValueType,
        copy: &RowCopy<'_>,
    ) -> Result<()>;

    /// Prunes rows `src_start[s] ..` (`counts[s]` of them) of every stream of sequence `s` and
    /// writes them compressed as tokens `dst_start[s] ..` of its destination streams.
    #[allow(clippy::too_many_arguments)]
    fn kv_prune_compress(
        device: &Self::Device,
        target: &CompressRef<'_, Self>,
        value_type: ValueType,
        sequences: usize,
        kv_heads: usize,
        head_dim: HeadDim,
        src_start: &[u32],
        dst_start: &[u32],
        counts: &[u32],
    ) -> Result<()>;

    /// Decode attention for queries `[sequences, q_heads, head_dim]` over an optional
    /// compressed segment followed by dense rows; returns `[sequences, q_heads, head_dim]`.
    fn kv_decode_attention(
        q: FloatTensor<Self>,
        segment: Option<SegmentRef<'_, Self>>,
        dense: DenseRef<'_, Self>,
        shape: &DecodeShape<'_>,
    ) -> Result<FloatTensor<Self>>;

    /// The projection of a decode step, `x · wᵀ`: `x` is `[m, k]` activations (one row per
    /// sequence, `m` at most [`SKINNY_MAX_ROWS`]) and `w` the weights as
    /// `[n, k]` rows (PyTorch's `nn.Linear` layout), both of the same float type; returns
    /// `[m, n]`. The weights are streamed once at memory bandwidth (the skinny-matmul kernel),
    /// where a general matmul would tile for reuse that a few rows do not have. With a
    /// `residual` `[m, n]` (same type) the result is `residual + x · wᵀ`, in the same launch.
    fn skinny_matmul(
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
    /// `[b, kv_heads, n, head_dim]` (the caches' layout), rotating queries and keys by the
    /// angles whose cosines and sines are `cos`, `sin` `[1 or b, n, head_dim / 2]` (shared by the
    /// sequences, or per sequence), in one launch.
    fn rope_split(
        qkv: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        heads: RopeHeads,
    ) -> Result<[FloatTensor<Self>; 3]>;

    /// SwiGLU in one launch: `gate_up` `[.., 2 * hidden]` holds the gate then the up
    /// projection on its last axis; returns `silu(gate) · up`, `[.., hidden]`, computed in f32.
    fn swiglu(gate_up: FloatTensor<Self>) -> Result<FloatTensor<Self>>;
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

/// A device buffer of a CubeCL runtime.
#[derive(Clone)]
pub struct CubeKvBuffer<R: CubeRuntime> {
    handle: Handle,
    bytes: usize,
    _runtime: std::marker::PhantomData<R>,
}

impl<R: CubeRuntime> std::fmt::Debug for CubeKvBuffer<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CubeKvBuffer({} bytes)", self.bytes)
    }
}

fn dtype_value_type(dtype: DType) -> Result<ValueType> {
    match dtype {
        DType::F32 => Ok(ValueType::F32),
        DType::F16 => Ok(ValueType::F16),
        DType::BF16 => Ok(ValueType::BF16),
        other => Err(KvCacheError::DType {
            what: "tensor",
            expected: "f32, f16 or bf16",
            actual: other,
        }),
    }
}

fn value_dtype(value_type: ValueType) -> DType {
    match value_type {
        ValueType::F32 => DType::F32,
        ValueType::F16 => DType::F16,
        ValueType::BF16 => DType::BF16,
    }
}

/// A typed error unless `tensor` holds `value_type` (an operand that must match the others).
fn check_dtype<R: CubeRuntime>(
    what: &'static str,
    tensor: &CubeTensor<R>,
    value_type: ValueType,
) -> Result<()> {
    if tensor.dtype == value_dtype(value_type) {
        Ok(())
    } else {
        Err(KvCacheError::DType {
            what,
            expected: value_type.name(),
            actual: tensor.dtype,
        })
    }
}

/// Calls `$body` with `$F` bound to the kernel element type of `$vt`.
macro_rules! with_float {
    ($vt:expr, $F:ident, $body:expr) => {
        match $vt {
            ValueType::F32 => {
                type $F = f32;
                $body
            }
            ValueType::F16 => {
                type $F = half::f16;
                $body
            }
            ValueType::BF16 => {
                type $F = half::bf16;
                $body
            }
        }
    };
}

fn row_args<'a>(copy: &RowCopy<'a>) -> CopyRowsArgs<'a> {
    CopyRowsArgs {
        sequences: copy.sequences,
        kv_heads: copy.kv_heads,
        head_dim: copy.head_dim.get(),
        src_capacity: copy.src_capacity,
        dst_capacity: copy.dst_capacity,
        src_start: copy.src_start,
        dst_start: copy.dst_start,
        counts: copy.counts,
    }
}

fn dims<R: CubeRuntime>(t: &CubeTensor<R>) -> Vec<usize> {
    t.meta.shape().iter().copied().collect()
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> SparseKvBackend
    for CubeBackend<R, F, I, BT>
{
    type KvBuffer = CubeKvBuffer<R>;

    fn kv_alloc(device: &Self::Device, bytes: usize) -> Result<Self::KvBuffer> {
        let limit = Self::max_buffer_bytes(device);
        if bytes as u64 > limit {
            return Err(KvCacheError::Allocation { bytes, limit });
        }
        let client = R::client(device);
        // Never zero bytes: a zero-sized binding is not valid on every runtime.
        Ok(CubeKvBuffer {
            handle: client.empty(bytes.max(16)),
            bytes,
            _runtime: std::marker::PhantomData,
        })
    }

    fn kv_buffer_bytes(buffer: &Self::KvBuffer) -> usize {
        buffer.bytes
    }

    fn max_buffer_bytes(device: &Self::Device) -> u64 {
        // CubeCL's memory pools take nothing larger than a page.
        R::client(device).properties().memory.max_page_size
    }

    fn kv_value_type(tensor: &FloatTensor<Self>) -> Result<ValueType> {
        dtype_value_type(tensor.dtype)
    }

    fn kv_write_rows(
        pairs: &[(FloatTensor<Self>, &Self::KvBuffer)],
        value_type: ValueType,
        copy: &RowCopy<'_>,
    ) -> Result<()> {
        let mut rows = Vec::with_capacity(pairs.len());
        for (t, _) in pairs {
            check_dtype("rows", t, value_type)?;
            rows.push(burn_cubecl::kernel::into_contiguous(t.clone()));
        }
        let Some(client) = rows.first().map(|r| r.client.clone()) else {
            return Ok(());
        };
        let handles: Vec<_> = rows
            .iter()
            .zip(pairs)
            .map(|(r, (_, dst))| (&r.handle, &dst.handle))
            .collect();
        with_float!(
            value_type,
            E,
            sparsekv_kernels::copy_rows::<R, E>(&client, &row_args(copy), &handles)?
        );
        Ok(())
    }

    fn kv_copy_rows(
        device: &Self::Device,
        pairs: &[(&Self::KvBuffer, &Self::KvBuffer)],
        value_type: ValueType,
        copy: &RowCopy<'_>,
    ) -> Result<()> {
        let client = R::client(device);
        let handles: Vec<_> = pairs
            .iter()
            .map(|(src, dst)| (&src.handle, &dst.handle))
            .collect();
        with_float!(
            value_type,
            E,
            sparsekv_kernels::copy_rows::<R, E>(&client, &row_args(copy), &handles)?
        );
        Ok(())
    }

    fn kv_prune_compress(
        device: &Self::Device,
        target: &CompressRef<'_, Self>,
        value_type: ValueType,
        sequences: usize,
        kv_heads: usize,
        head_dim: HeadDim,
        src_start: &[u32],
        dst_start: &[u32],
        counts: &[u32],
    ) -> Result<()> {
        let client = R::client(device);
        let keep = sparsekv_format::keep_count(target.sparsity, head_dim);
        let args = CompressArgs {
            sequences,
            kv_heads,
            head_dim,
            sparsity: target.sparsity,
            src_stride: target.src_capacity * head_dim.get(),
            src_start,
            dst_start,
            counts,
            bitmap_stride: sparsekv_format::layout::bitmap_words(target.capacity, head_dim),
            values_stride: target.capacity * keep,
        };
        with_float!(
            value_type,
            E,
            sparsekv_kernels::prune_compress::<R, E>(
                &client,
                &args,
                &target.src.handle,
                &target.bitmap.handle,
                &target.values.handle
            )?
        );
        Ok(())
    }

    fn kv_decode_attention(
        q: FloatTensor<Self>,
        segment: Option<SegmentRef<'_, Self>>,
        dense: DenseRef<'_, Self>,
        shape: &DecodeShape<'_>,
    ) -> Result<FloatTensor<Self>> {
        let value_type = dtype_value_type(q.dtype)?;
        let d = shape.head_dim.get();
        let q_dims = dims(&q);
        let batch = shape.compressed_lens.len();
        if q_dims != [batch, shape.q_heads, d] {
            return Err(KvCacheError::Shape {
                what: "queries",
                expected: vec![batch, shape.q_heads, d],
                actual: q_dims,
            });
        }
        let q = burn_cubecl::kernel::into_contiguous(q);
        let client = q.client.clone();
        let out_handle = client.empty(batch * shape.q_heads * d * value_type.size_bytes());
        let args = AttentionArgs {
            batch,
            q_heads: shape.q_heads,
            kv_heads: shape.kv_heads,
            head_dim: shape.head_dim,
            compressed_lens: shape.compressed_lens,
            window_lens: shape.dense_lens,
        };
        let window = DenseCacheArgs {
            k: &dense.k.handle,
            v: &dense.v.handle,
            stride: dense.capacity * d,
        };
        let seg = segment.as_ref().map(|s| {
            let keep = |sp| sparsekv_format::keep_count(sp, shape.head_dim);
            SparseSegmentArgs {
                k_bitmap: &s.k_bitmap.handle,
                k_values: &s.k_values.handle,
                v_bitmap: &s.v_bitmap.handle,
                v_values: &s.v_values.handle,
                bitmap_stride: sparsekv_format::layout::bitmap_words(s.capacity, shape.head_dim),
                k_values_stride: s.capacity * keep(s.k_sparsity),
                v_values_stride: s.capacity * keep(s.v_sparsity),
                k_sparsity: s.k_sparsity,
                v_sparsity: s.v_sparsity,
            }
        });
        with_float!(
            value_type,
            E,
            sparsekv_kernels::decode_attention::<R, E>(
                &client,
                &args,
                &q.handle,
                seg.as_ref(),
                &window,
                &out_handle
            )?
        );
        Ok(CubeTensor::new_contiguous(
            client,
            q.device.clone(),
            burn::tensor::Shape::from(vec![batch, shape.q_heads, d]),
            out_handle,
            value_dtype(value_type),
        ))
    }

    fn skinny_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        residual: Option<FloatTensor<Self>>,
    ) -> Result<FloatTensor<Self>> {
        let value_type = dtype_value_type(x.dtype)?;
        check_dtype("weights", &w, value_type)?;
        if let Some(r) = &residual {
            check_dtype("residual", r, value_type)?;
        }
        let (x_dims, w_dims) = (dims(&x), dims(&w));
        let (&[m, k], &[n, wk]) = (x_dims.as_slice(), w_dims.as_slice()) else {
            return Err(KvCacheError::Shape {
                what: "skinny matmul operands (activations [m, k], weights [n, k])",
                expected: vec![0, 0],
                actual: if x_dims.len() == 2 { w_dims } else { x_dims },
            });
        };
        if wk != k {
            return Err(KvCacheError::Shape {
                what: "weights",
                expected: vec![0, k],
                actual: w_dims,
            });
        }
        if let Some(r) = &residual
            && dims(r) != [m, n]
        {
            return Err(KvCacheError::Shape {
                what: "residual",
                expected: vec![m, n],
                actual: dims(r),
            });
        }
        let x = burn_cubecl::kernel::into_contiguous(x);
        let w = burn_cubecl::kernel::into_contiguous(w);
        let residual = residual.map(burn_cubecl::kernel::into_contiguous);
        let client = x.client.clone();
        let out = client.empty(m * n * value_type.size_bytes());
        with_float!(
            value_type,
            E,
            sparsekv_kernels::skinny_matmul_with::<R, E>(
                &client,
                SkinnyShape { m, n, k },
                &x.handle,
                &w.handle,
                residual.as_ref().map(|r| &r.handle),
                &out,
                None
            )?
        );
        Ok(CubeTensor::new_contiguous(
            client,
            x.device.clone(),
            burn::tensor::Shape::from(vec![m, n]),
            out,
            value_dtype(value_type),
        ))
    }

    fn rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> Result<FloatTensor<Self>> {
        let value_type = dtype_value_type(x.dtype)?;
        check_dtype("RMSNorm weights", &weight, value_type)?;
        let x_dims = dims(&x);
        let dim = x_dims.last().copied().unwrap_or(0);
        if dims(&weight) != [dim] {
            return Err(KvCacheError::Shape {
                what: "RMSNorm weights",
                expected: vec![dim],
                actual: dims(&weight),
            });
        }
        let rows = x_dims.iter().product::<usize>() / dim.max(1);
        let x = burn_cubecl::kernel::into_contiguous(x);
        let weight = burn_cubecl::kernel::into_contiguous(weight);
        let client = x.client.clone();
        let out = client.empty((rows * dim * value_type.size_bytes()).max(16));
        with_float!(
            value_type,
            E,
            sparsekv_kernels::rms_norm::<R, E>(
                &client,
                rows,
                dim,
                eps as f32,
                &x.handle,
                &weight.handle,
                &out
            )?
        );
        Ok(CubeTensor::new_contiguous(
            client,
            x.device.clone(),
            burn::tensor::Shape::from(x_dims),
            out,
            value_dtype(value_type),
        ))
    }

    fn rope_split(
        qkv: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        heads: RopeHeads,
    ) -> Result<[FloatTensor<Self>; 3]> {
        let value_type = dtype_value_type(qkv.dtype)?;
        check_dtype("RoPE cos", &cos, value_type)?;
        check_dtype("RoPE sin", &sin, value_type)?;
        let RopeHeads {
            q_heads,
            kv_heads,
            style,
        } = heads;
        let qkv_dims = dims(&qkv);
        let heads_total = q_heads + 2 * kv_heads;
        let &[b, n, width] = qkv_dims.as_slice() else {
            return Err(KvCacheError::Shape {
                what: "fused QKV",
                expected: vec![0, 0, 0],
                actual: qkv_dims,
            });
        };
        let d = width.checked_div(heads_total).unwrap_or(0);
        if d * heads_total != width || d % 2 != 0 {
            return Err(KvCacheError::Invalid(format!(
                "fused QKV rows of {width} are not {q_heads} + 2 x {kv_heads} heads of an even head_dim"
            )));
        }
        let cos_dims = dims(&cos);
        let angles_per_sequence = cos_dims.first() == Some(&b) && b > 1;
        for (what, t) in [("RoPE cos", &cos), ("RoPE sin", &sin)] {
            let got = dims(t);
            if got.len() != 3 || !(got[0] == 1 || got[0] == b) || got[1..] != [n, d / 2] {
                return Err(KvCacheError::Shape {
                    what,
                    expected: vec![b, n, d / 2],
                    actual: got,
                });
            }
        }
        let qkv = burn_cubecl::kernel::into_contiguous(qkv);
        let cos = burn_cubecl::kernel::into_contiguous(cos);
        let sin = burn_cubecl::kernel::into_contiguous(sin);
        let client = qkv.client.clone();
        let es = value_type.size_bytes();
        let alloc = |heads: usize| client.empty((b * n * heads * d * es).max(16));
        let (q, k, v) = (alloc(q_heads), alloc(kv_heads), alloc(kv_heads));
        let shape = RopeShape {
            sequences: b,
            tokens: n,
            q_heads,
            kv_heads,
            head_dim: d,
            angles_per_sequence,
        };
        with_float!(
            value_type,
            E,
            sparsekv_kernels::rope_split::<R, E>(
                &client,
                shape,
                style,
                &qkv.handle,
                &cos.handle,
                &sin.handle,
                &q,
                &k,
                &v
            )?
        );
        let tensor = |handle, shape: Vec<usize>| {
            CubeTensor::new_contiguous(
                client.clone(),
                qkv.device.clone(),
                burn::tensor::Shape::from(shape),
                handle,
                value_dtype(value_type),
            )
        };
        Ok([
            tensor(q, vec![b, n, q_heads, d]),
            tensor(k, vec![b, kv_heads, n, d]),
            tensor(v, vec![b, kv_heads, n, d]),
        ])
    }

    fn swiglu(gate_up: FloatTensor<Self>) -> Result<FloatTensor<Self>> {
        let value_type = dtype_value_type(gate_up.dtype)?;
        let mut shape = dims(&gate_up);
        let width = shape.last().copied().unwrap_or(0);
        if width % 2 != 0 {
            return Err(KvCacheError::Invalid(format!(
                "SwiGLU input rows of {width} are not a gate and an up half"
            )));
        }
        let hidden = width / 2;
        let rows = shape.iter().product::<usize>() / width.max(1);
        if let Some(last) = shape.last_mut() {
            *last = hidden;
        }
        let gate_up = burn_cubecl::kernel::into_contiguous(gate_up);
        let client = gate_up.client.clone();
        let out = client.empty((rows * hidden * value_type.size_bytes()).max(16));
        with_float!(
            value_type,
            E,
            sparsekv_kernels::swiglu::<R, E>(&client, rows, hidden, &gate_up.handle, &out)?
        );
        Ok(CubeTensor::new_contiguous(
            client,
            gate_up.device.clone(),
            burn::tensor::Shape::from(shape),
            out,
            value_dtype(value_type),
        ))
    }
}
