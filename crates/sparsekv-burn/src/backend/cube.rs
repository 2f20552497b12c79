//! [`SparseKvBackend`] for Burn's `CubeBackend` over any CubeCL runtime: each operation checks
//! its operands (the shared checks of [`super`]) and launches its kernel at once.

use burn::tensor::ops::FloatTensor;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use sparsekv_format::{PromptShape, ValueType};
use sparsekv_kernels::cubecl::server::Handle;
use sparsekv_kernels::{
    AttentionArgs, CompressArgs, CompressTarget as KernelCompressTarget, CopyRowsArgs,
    DenseCacheArgs, ExpandArgs, RopeShape, SkinnyInput, SparseSegmentArgs,
};

use super::{
    CompressTarget, CompressedStreams, ContextLayout, DecodeShape, DenseRows, DeviceMemory,
    RopeHeads, RowCopy, Segment, SparseKvBackend, check_rows, check_view, decode_output,
    projection_plan, prompt_plan, rms_norm_plan, rope_append_plan, rope_output_dims, rope_plan,
    row_args, skinny_plan, swiglu_plan, value_dtype,
};
use crate::error::{KvCacheError, Result};

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

/// A contiguous tensor of `dims` over `handle`, on the device and client of `like`.
fn tensor_like<R: CubeRuntime>(
    like: &CubeTensor<R>,
    handle: Handle,
    dims: Vec<usize>,
    value_type: ValueType,
) -> CubeTensor<R> {
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        burn::tensor::Shape::from(dims),
        handle,
        value_dtype(value_type),
    )
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

    fn kv_view(buffer: &Self::KvBuffer, offset: usize, bytes: usize) -> Result<Self::KvBuffer> {
        check_view(buffer.bytes, offset, bytes)?;
        // Offsets add up on a view of a view; the end offset trims what lies past the range.
        let tail = buffer.handle.size_in_used() - (offset + bytes) as u64;
        Ok(CubeKvBuffer {
            handle: buffer
                .handle
                .clone()
                .offset_start(offset as u64)
                .offset_end(tail),
            bytes,
            _runtime: std::marker::PhantomData,
        })
    }

    fn max_buffer_bytes(device: &Self::Device) -> u64 {
        // CubeCL's memory pools take nothing larger than a page.
        R::client(device).properties().memory.max_page_size
    }

    fn device_memory(device: &Self::Device) -> Option<DeviceMemory> {
        #[cfg(feature = "cuda")]
        if let Some(cuda) =
            (device as &dyn std::any::Any).downcast_ref::<burn::backend::cuda::CudaDevice>()
        {
            let client = R::client(device);
            let (free, total) = cuda_memory(cuda.index)?;
            // Pool pages CubeCL holds but does not use count as free for the caches.
            let pooled = client.memory_usage().map_or(0, |u| {
                u.bytes_reserved
                    .saturating_sub(u.bytes_in_use)
                    .saturating_sub(u.bytes_padding)
            });
            return Some(DeviceMemory {
                available: free.saturating_add(pooled),
                total,
            });
        }
        let _ = device;
        None
    }

    fn persistent_memory<T: Send>(
        device: &Self::Device,
        make: impl FnOnce() -> T + Send,
    ) -> Result<T> {
        R::client(device)
            .memory_persistent_allocation((), |()| make())
            .map_err(|e| KvCacheError::Invalid(format!("persistent allocation: {e:?}")))
    }

    fn kv_write_rows(
        pairs: &[(FloatTensor<Self>, &Self::KvBuffer)],
        value_type: ValueType,
        copy: &RowCopy,
    ) -> Result<()> {
        check_rows(pairs.iter().map(|(t, _)| t), value_type)?;
        let rows: Vec<_> = pairs
            .iter()
            .map(|(t, _)| burn_cubecl::kernel::into_contiguous(t.clone()))
            .collect();
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
        copy: &RowCopy,
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
        targets: &[CompressTarget<Self>],
        value_type: ValueType,
        rows: &RowCopy,
    ) -> Result<()> {
        let client = R::client(device);
        let targets: Vec<_> = targets
            .iter()
            .map(|t| kernel_target(&t.src.handle, &t.dest))
            .collect();
        prune_compress_handles(&client, &targets, value_type, rows)
    }

    fn kv_compress_rows(
        sources: Vec<(FloatTensor<Self>, CompressedStreams<Self>)>,
        value_type: ValueType,
        rows: &RowCopy,
    ) -> Result<()> {
        check_rows(sources.iter().map(|(t, _)| t), value_type)?;
        let sources: Vec<_> = sources
            .into_iter()
            .map(|(t, dest)| (burn_cubecl::kernel::into_contiguous(t), dest))
            .collect();
        let Some(client) = sources.first().map(|(t, _)| t.client.clone()) else {
            return Ok(());
        };
        let targets: Vec<_> = sources
            .iter()
            .map(|(t, dest)| kernel_target(&t.handle, dest))
            .collect();
        prune_compress_handles(&client, &targets, value_type, rows)
    }

    fn kv_decode_attention(
        q: FloatTensor<Self>,
        segment: Option<&Segment<Self>>,
        dense: &DenseRows<Self>,
        shape: &DecodeShape,
    ) -> Result<FloatTensor<Self>> {
        let (value_type, out_dims) = decode_output(&q, shape)?;
        let d = shape.head_dim.get();
        let q = burn_cubecl::kernel::into_contiguous(q);
        let client = q.client.clone();
        let out_handle = client.empty(out_dims.iter().product::<usize>() * value_type.size_bytes());
        let args = AttentionArgs {
            batch: shape.compressed_lens.len(),
            q_heads: shape.q_heads,
            kv_heads: shape.kv_heads,
            head_dim: shape.head_dim,
            compressed_lens: &shape.compressed_lens,
            window_lens: &shape.dense_lens,
            row_sequences: Some(&shape.row_sequences),
        };
        let window = DenseCacheArgs {
            k: &dense.k.handle,
            v: &dense.v.handle,
            stride: dense.capacity * d,
        };
        let seg = segment.map(|s| {
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
        Ok(tensor_like(&q, out_handle, out_dims, value_type))
    }

    fn skinny_matmul(
        x: FloatTensor<Self>,
        input: SkinnyInput<FloatTensor<Self>>,
        w: FloatTensor<Self>,
        residual: Option<FloatTensor<Self>>,
    ) -> Result<FloatTensor<Self>> {
        let (value_type, shape) = skinny_plan(&x, &input, &w, residual.as_ref())?;
        let x = burn_cubecl::kernel::into_contiguous(x);
        let input = input.map(burn_cubecl::kernel::into_contiguous);
        let w = burn_cubecl::kernel::into_contiguous(w);
        let residual = residual.map(burn_cubecl::kernel::into_contiguous);
        let client = x.client.clone();
        let out = client.empty(shape.m * shape.n * value_type.size_bytes());
        with_float!(
            value_type,
            E,
            sparsekv_kernels::skinny_matmul_with::<R, E>(
                &client,
                shape,
                input.as_ref().map(|t| &t.handle),
                &x.handle,
                &w.handle,
                residual.as_ref().map(|r| &r.handle),
                &out,
                None
            )?
        );
        Ok(tensor_like(&x, out, vec![shape.m, shape.n], value_type))
    }

    fn prompt_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        residual: Option<FloatTensor<Self>>,
    ) -> Result<FloatTensor<Self>> {
        use burn::tensor::ops::FloatTensorOps;
        let (value_type, shape) = projection_plan(&x, &w, residual.as_ref())?;
        // [k, n]: the weights as the right operand, a transposed view (no copy).
        let wt = Self::float_transpose(w);
        let tma = match value_type {
            ValueType::F16 | ValueType::BF16 => tma_matmul(&x, &wt, shape.m, shape.n, value_type),
            ValueType::F32 => None,
        };
        let out = match tma {
            Some(out) => out,
            None => {
                let dtype = x.dtype;
                burn_cubecl::kernel::matmul::matmul(
                    x,
                    wt,
                    None,
                    burn_cubecl::kernel::matmul::MatmulStrategy::default(),
                    dtype,
                )
                .map_err(|e| KvCacheError::Invalid(format!("matmul: {e:?}")))?
            }
        };
        Ok(match residual {
            Some(r) => Self::float_add(out, r),
            None => out,
        })
    }

    fn rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> Result<FloatTensor<Self>> {
        let plan = rms_norm_plan(&x, &weight, eps)?;
        let x = burn_cubecl::kernel::into_contiguous(x);
        let weight = burn_cubecl::kernel::into_contiguous(weight);
        let client = x.client.clone();
        let out = client.empty((plan.rows * plan.dim * plan.value_type.size_bytes()).max(16));
        with_float!(
            plan.value_type,
            E,
            sparsekv_kernels::rms_norm::<R, E>(
                &client,
                plan.rows,
                plan.dim,
                eps as f32,
                &x.handle,
                &weight.handle,
                &out
            )?
        );
        Ok(tensor_like(&x, out, plan.dims, plan.value_type))
    }

    fn rope_split(
        qkv: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        starts: &[usize],
        heads: RopeHeads,
    ) -> Result<[FloatTensor<Self>; 3]> {
        let (value_type, shape) = rope_plan(&qkv, &cos, &sin, starts, heads)?;
        let es = value_type.size_bytes();
        let [_, k_dims, v_dims] = rope_output_dims(&shape);
        let alloc = |dims: &[usize]| {
            qkv.client
                .empty((dims.iter().product::<usize>() * es).max(16))
        };
        let (k, v) = (alloc(&k_dims), alloc(&v_dims));
        // Every token's row, at its own place in tensors of `tokens` rows per stream.
        let zeros = vec![0; shape.sequences];
        let counts = vec![shape.tokens as u32; shape.sequences];
        let rows = CopyRowsArgs {
            sequences: shape.sequences,
            kv_heads: shape.kv_heads,
            head_dim: shape.head_dim,
            src_capacity: shape.tokens,
            dst_capacity: shape.tokens,
            src_start: &zeros,
            dst_start: &zeros,
            counts: &counts,
        };
        let like = qkv.clone();
        let q = rope_into(
            qkv,
            cos,
            sin,
            starts,
            heads,
            (value_type, shape),
            [&k, &v],
            &rows,
        )?;
        Ok([
            q,
            tensor_like(&like, k, k_dims, value_type),
            tensor_like(&like, v, v_dims, value_type),
        ])
    }

    fn rope_append(
        qkv: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        starts: &[usize],
        heads: RopeHeads,
        [k, v]: [&Self::KvBuffer; 2],
        value_type: ValueType,
        copy: &RowCopy,
    ) -> Result<FloatTensor<Self>> {
        let shape = rope_append_plan(&qkv, &cos, &sin, starts, heads, value_type)?;
        let (plan, rows) = ((value_type, shape), row_args(copy));
        rope_into(
            qkv,
            cos,
            sin,
            starts,
            heads,
            plan,
            [&k.handle, &v.handle],
            &rows,
        )
    }

    fn swiglu(gate_up: FloatTensor<Self>) -> Result<FloatTensor<Self>> {
        let plan = swiglu_plan(&gate_up)?;
        let gate_up = burn_cubecl::kernel::into_contiguous(gate_up);
        let client = gate_up.client.clone();
        let out = client.empty((plan.rows * plan.dim * plan.value_type.size_bytes()).max(16));
        with_float!(
            plan.value_type,
            E,
            sparsekv_kernels::swiglu::<R, E>(&client, plan.rows, plan.dim, &gate_up.handle, &out)?
        );
        Ok(tensor_like(&gate_up, out, plan.dims, plan.value_type))
    }

    fn kv_expand_context(
        device: &Self::Device,
        segment: &Segment<Self>,
        window: &DenseRows<Self>,
        layout: &ContextLayout,
    ) -> Result<[FloatTensor<Self>; 2]> {
        let client = R::client(device);
        let sequences = layout.compressed_lens.len();
        let dims = layout.dims();
        let bytes = dims.iter().product::<usize>() * layout.value_type.size_bytes();
        let expand = |bitmap: &Self::KvBuffer,
                      values: &Self::KvBuffer,
                      rows: &Self::KvBuffer,
                      sparsity|
         -> Result<FloatTensor<Self>> {
            let out = client.empty(bytes);
            let args = ExpandArgs {
                sequences,
                kv_heads: layout.kv_heads,
                head_dim: layout.head_dim,
                sparsity,
                capacity: segment.capacity,
                window_capacity: window.capacity,
                compressed: &layout.compressed_lens,
                window: &layout.dense_lens,
                context: layout.context,
            };
            with_float!(
                layout.value_type,
                E,
                sparsekv_kernels::expand_context::<R, E>(
                    &client,
                    &args,
                    &bitmap.handle,
                    &values.handle,
                    &rows.handle,
                    &out
                )?
            );
            Ok(CubeTensor::new_contiguous(
                client.clone(),
                device.clone(),
                burn::tensor::Shape::from(dims.clone()),
                out,
                value_dtype(layout.value_type),
            ))
        };
        Ok([
            expand(
                &segment.k_bitmap,
                &segment.k_values,
                &window.k,
                segment.k_sparsity,
            )?,
            expand(
                &segment.v_bitmap,
                &segment.v_values,
                &window.v,
                segment.v_sparsity,
            )?,
        ])
    }

    fn prompt_attention_unsupported(
        device: &Self::Device,
        value_type: ValueType,
        shape: PromptShape,
    ) -> Option<String> {
        let client = R::client(device);
        with_float!(
            value_type,
            E,
            sparsekv_kernels::prefill_attention_unsupported::<R, E>(&client, shape)
        )
    }

    fn prompt_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> Result<FloatTensor<Self>> {
        let plan = prompt_plan(&q, &k, &v)?;
        let [q, k, v] = [q, k, v].map(burn_cubecl::kernel::into_contiguous);
        let client = q.client.clone();
        let out = client.empty(plan.dims.iter().product::<usize>() * plan.value_type.size_bytes());
        with_float!(
            plan.value_type,
            E,
            sparsekv_kernels::prefill_attention::<R, E>(
                &client, plan.shape, &q.handle, &k.handle, &v.handle, &out
            )?
        );
        Ok(tensor_like(&q, out, plan.dims, plan.value_type))
    }
}

/// The RoPE split of [`SparseKvBackend::rope_split`] and [`SparseKvBackend::rope_append`]:
/// the queries in a new tensor, the keys and values into `k` and `v` as `rows` says; `plan`
/// is the checked value type and shape.
#[allow(clippy::too_many_arguments)]
fn rope_into<R: CubeRuntime>(
    qkv: CubeTensor<R>,
    cos: CubeTensor<R>,
    sin: CubeTensor<R>,
    starts: &[usize],
    heads: RopeHeads,
    (value_type, shape): (ValueType, RopeShape),
    kv: [&Handle; 2],
    rows: &CopyRowsArgs<'_>,
) -> Result<CubeTensor<R>> {
    // Checked against the tables' rows, so they fit u32.
    let starts: Vec<u32> = starts.iter().map(|&s| s as u32).collect();
    let qkv = burn_cubecl::kernel::into_contiguous(qkv);
    let cos = burn_cubecl::kernel::into_contiguous(cos);
    let sin = burn_cubecl::kernel::into_contiguous(sin);
    let client = qkv.client.clone();
    let [q_dims, _, _] = rope_output_dims(&shape);
    let q_bytes = q_dims.iter().product::<usize>() * value_type.size_bytes();
    let q = client.empty(q_bytes.max(16));
    with_float!(
        value_type,
        E,
        sparsekv_kernels::rope_split::<R, E>(
            &client,
            shape,
            heads.style,
            &qkv.handle,
            &cos.handle,
            &sin.handle,
            &starts,
            &q,
            kv,
            rows
        )?
    );
    Ok(tensor_like(&qkv, q, q_dims, value_type))
}

/// The kernel's view of dense rows `src` compressed into `dest`.
fn kernel_target<'a, R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    src: &'a Handle,
    dest: &'a CompressedStreams<CubeBackend<R, F, I, BT>>,
) -> KernelCompressTarget<'a> {
    KernelCompressTarget {
        src,
        bitmap: &dest.bitmap.handle,
        values: &dest.values.handle,
        sparsity: dest.sparsity,
    }
}

/// Prune+compress of `rows` for one or two targets in one launch (the launch of
/// [`SparseKvBackend::kv_prune_compress`] and [`SparseKvBackend::kv_compress_rows`]).
fn prune_compress_handles<R: CubeRuntime>(
    client: &sparsekv_kernels::cubecl::client::ComputeClient<R>,
    targets: &[KernelCompressTarget<'_>],
    value_type: ValueType,
    rows: &RowCopy,
) -> Result<()> {
    let args = CompressArgs {
        sequences: rows.sequences,
        kv_heads: rows.kv_heads,
        head_dim: rows.head_dim,
        src_stride: rows.src_capacity * rows.head_dim.get(),
        src_start: &rows.src_start,
        dst_start: &rows.dst_start,
        counts: &rows.counts,
        capacity: rows.dst_capacity,
    };
    with_float!(
        value_type,
        E,
        sparsekv_kernels::prune_compress::<R, E>(client, &args, targets)?
    );
    Ok(())
}

/// `x [m, k] · wt [k, n]` on cubek's warp-specialised TMA matmul (16-bit operands, f32
/// accumulation), or `None` where it does not launch (a device without TMA, a layout it does
/// not take): the caller falls back to Burn's matmul.
fn tma_matmul<R: CubeRuntime>(
    x: &CubeTensor<R>,
    wt: &CubeTensor<R>,
    m: usize,
    n: usize,
    value_type: ValueType,
) -> Option<CubeTensor<R>> {
    use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems};
    use cubek::matmul::launch::{Strategy, launch_ref};
    use cubek::std::InputBinding;
    let client = x.client.clone();
    let out = tensor_like(
        x,
        client.empty(m * n * value_type.size_bytes()),
        vec![m, n],
        value_type,
    );
    let storage = x.dtype.into();
    let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems {
        lhs: storage,
        rhs: storage,
        out: storage,
    });
    launch_ref(
        &Strategy::SpecializedTmaMma(Default::default()),
        &client,
        InputBinding::new(x.clone().binding(), storage),
        InputBinding::new(wt.clone().binding(), storage),
        out.clone().binding(),
        &mut dtypes,
    )
    .ok()
    .map(|()| out)
}

/// Free and total memory of CUDA device `ordinal`, from the driver (`cuMemGetInfo`).
#[cfg(feature = "cuda")]
fn cuda_memory(ordinal: usize) -> Option<(u64, u64)> {
    use cudarc::driver::result;
    let device = result::device::get(i32::try_from(ordinal).ok()?).ok()?;
    // SAFETY: `device` is a valid device handle (the runtime has initialised the driver and
    // this device, whose client the caller holds). Retaining its primary context (the one
    // CubeCL's CUDA runtime uses: no new context is created) and making it current on this
    // thread is what `cuMemGetInfo` needs; the retain is released right after.
    unsafe {
        let context = result::primary_ctx::retain(device).ok()?;
        let info = result::ctx::set_current(context)
            .ok()
            .and_then(|()| result::mem_get_info().ok());
        let _ = result::primary_ctx::release(device);
        info.map(|(free, total)| (free as u64, total as u64))
    }
}
