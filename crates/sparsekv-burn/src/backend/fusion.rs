//! [`SparseKvBackend`] for Burn's `Fusion<B>`, the backend type `burn::backend::Wgpu` and
//! `burn::backend::Cuda` are with Burn's default features, over any `B` that implements the
//! extension (Burn 0.21's idiom for backend extensions under fusion, as in burn-vision).
//!
//! A fused backend runs nothing when an operation is called: it records the operation on the
//! calling thread's fusion stream and runs it, in order, when the stream is flushed (a read,
//! a sync, or a full queue). So every operation of the extension, the cache buffers' too, is
//! queued the same way: a [`CustomOpIr`] naming its input and output tensors, and an
//! [`Operation`] that resolves the inner tensors and calls `B`'s implementation. Buffers are
//! not tensors of the stream; the queued operation holds shared handles to them, and the
//! stream's order is what orders a buffer's writes and reads.
//!
//! Every check that can fail runs when the operation is called (the shared checks of
//! [`super`]: shapes and types are known before anything runs), so bad input still returns a
//! typed error at once. What can only fail when the kernel is launched (a launch the runtime
//! refuses) is recorded, and the caches return it from their next operation
//! ([`crate::runtime::check_device_threads`]).

use std::marker::PhantomData;

use burn::tensor::ops::FloatTensor;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Client, Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use sparsekv_format::ValueType;

use super::{
    CompressTarget, DecodeShape, DenseRows, RopeHeads, RowCopy, Segment, SparseKvBackend,
    check_rows, decode_output, rms_norm_plan, rope_output_dims, rope_plan, skinny_plan,
    swiglu_plan, value_dtype,
};
use crate::error::{KvCacheError, Result};

/// The inner backend's tensor handles, as a queued operation sees them when it runs.
type Handles<B> =
    HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

/// The float tensor of the inner backend `B`.
type Inner<B> = FloatTensor<B>;

/// One extension operation waiting on a fusion stream: `run` gets the operation's
/// description (its input and output tensors) and the stream's handles when it runs.
struct Queued<B, F> {
    desc: CustomOpIr,
    run: F,
    // `fn() -> B`: the operation holds no `B`, so it is `Send` and `Sync` whatever `B` is.
    _backend: PhantomData<fn() -> B>,
}

impl<B, F> std::fmt::Debug for Queued<B, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Queued({})", self.desc.id)
    }
}

impl<B, F> Operation<B::FusionRuntime> for Queued<B, F>
where
    B: FusionBackend + SparseKvBackend,
    F: Fn(&CustomOpIr, &mut Handles<B>) -> Result<()> + Send + Sync + 'static,
{
    fn execute(&self, handles: &mut Handles<B>) {
        if let Err(error) = (self.run)(&self.desc, handles) {
            crate::runtime::record_queued_failure(&self.desc.id, &error);
        }
    }
}

/// Queues `run` on the calling thread's fusion stream of `client` as the operation `name`,
/// reading `inputs` and writing new tensors of the given shapes and type; returns them.
fn queue<B, F>(
    client: &Client<B::FusionRuntime>,
    name: &'static str,
    inputs: Vec<FusionTensor<B::FusionRuntime>>,
    outputs: &[Vec<usize>],
    value_type: ValueType,
    run: F,
) -> Vec<FusionTensor<B::FusionRuntime>>
where
    B: FusionBackend + SparseKvBackend,
    F: Fn(&CustomOpIr, &mut Handles<B>) -> Result<()> + Send + Sync + 'static,
{
    let streams = OperationStreams::with_inputs(inputs.iter());
    let inputs: Vec<TensorIr> = inputs.into_iter().map(FusionTensor::into_ir).collect();
    let outputs: Vec<TensorIr> = outputs
        .iter()
        .map(|dims| {
            TensorIr::uninit(
                client.create_empty_handle(),
                burn::tensor::Shape::from(dims.clone()),
                value_dtype(value_type),
            )
        })
        .collect();
    let desc = CustomOpIr::new(name, &inputs, &outputs);
    let operation = Queued::<B, F> {
        desc: desc.clone(),
        run,
        _backend: PhantomData,
    };
    client.register(streams, OperationIr::Custom(desc), operation)
}

/// The inner tensors of a queued operation's inputs, in order.
fn inner_inputs<B: FusionBackend>(desc: &CustomOpIr, handles: &mut Handles<B>) -> Vec<Inner<B>> {
    desc.inputs
        .iter()
        .map(|ir| handles.get_float_tensor::<B>(ir))
        .collect()
}

/// Hands a queued operation's results to the stream as its output tensors.
fn register_outputs<B: FusionBackend>(
    desc: &CustomOpIr,
    handles: &mut Handles<B>,
    results: impl IntoIterator<Item = Inner<B>>,
) {
    for (ir, tensor) in desc.outputs.iter().zip(results) {
        handles.register_float_tensor::<B>(&ir.id, tensor);
    }
}

/// The single output of an operation that queued exactly one.
fn single<T>(outputs: Vec<T>) -> Result<T> {
    let n = outputs.len();
    let mut outputs = outputs.into_iter();
    match (outputs.next(), outputs.next()) {
        (Some(out), None) => Ok(out),
        _ => Err(KvCacheError::Invalid(format!(
            "a queued operation returned {n} tensors where one was expected"
        ))),
    }
}

impl<B: FusionBackend + SparseKvBackend> SparseKvBackend for Fusion<B> {
    type KvBuffer = B::KvBuffer;

    fn kv_alloc(device: &Self::Device, bytes: usize) -> Result<Self::KvBuffer> {
        // Allocation needs no order: nothing reads the buffer before a queued write.
        B::kv_alloc(device, bytes)
    }

    fn kv_buffer_bytes(buffer: &Self::KvBuffer) -> usize {
        B::kv_buffer_bytes(buffer)
    }

    fn max_buffer_bytes(device: &Self::Device) -> u64 {
        B::max_buffer_bytes(device)
    }

    fn kv_write_rows(
        pairs: &[(FloatTensor<Self>, &Self::KvBuffer)],
        value_type: ValueType,
        copy: &RowCopy,
    ) -> Result<()> {
        check_rows(pairs.iter().map(|(t, _)| t), value_type)?;
        let Some(client) = pairs.first().map(|(t, _)| t.client.clone()) else {
            return Ok(());
        };
        let tensors = pairs.iter().map(|(t, _)| t.clone()).collect();
        let buffers: Vec<B::KvBuffer> = pairs.iter().map(|(_, b)| (*b).clone()).collect();
        let copy = copy.clone();
        queue::<B, _>(
            &client,
            "sparsekv_write_rows",
            tensors,
            &[],
            value_type,
            move |desc, handles| {
                let rows = inner_inputs::<B>(desc, handles);
                let pairs: Vec<_> = rows.into_iter().zip(&buffers).collect();
                B::kv_write_rows(&pairs, value_type, &copy)
            },
        );
        Ok(())
    }

    fn kv_copy_rows(
        device: &Self::Device,
        pairs: &[(&Self::KvBuffer, &Self::KvBuffer)],
        value_type: ValueType,
        copy: &RowCopy,
    ) -> Result<()> {
        let device = device.clone();
        let buffers: Vec<(B::KvBuffer, B::KvBuffer)> = pairs
            .iter()
            .map(|(src, dst)| ((*src).clone(), (*dst).clone()))
            .collect();
        let copy = copy.clone();
        queue::<B, _>(
            &burn_fusion::get_client::<B>(&device),
            "sparsekv_copy_rows",
            Vec::new(),
            &[],
            value_type,
            move |_, _| {
                let pairs: Vec<_> = buffers.iter().map(|(s, d)| (s, d)).collect();
                B::kv_copy_rows(&device, &pairs, value_type, &copy)
            },
        );
        Ok(())
    }

    fn kv_prune_compress(
        device: &Self::Device,
        target: &CompressTarget<Self>,
        value_type: ValueType,
        rows: &RowCopy,
    ) -> Result<()> {
        let device = device.clone();
        let target = target.rebind::<B>();
        let rows = rows.clone();
        queue::<B, _>(
            &burn_fusion::get_client::<B>(&device),
            "sparsekv_prune_compress",
            Vec::new(),
            &[],
            value_type,
            move |_, _| B::kv_prune_compress(&device, &target, value_type, &rows),
        );
        Ok(())
    }

    fn kv_decode_attention(
        q: FloatTensor<Self>,
        segment: Option<&Segment<Self>>,
        dense: &DenseRows<Self>,
        shape: &DecodeShape,
    ) -> Result<FloatTensor<Self>> {
        let (value_type, out_dims) = decode_output(&q, shape)?;
        let client = q.client.clone();
        let segment = segment.map(Segment::rebind::<B>);
        let dense = dense.rebind::<B>();
        let shape = shape.clone();
        let outputs = queue::<B, _>(
            &client,
            "sparsekv_decode_attention",
            vec![q],
            &[out_dims],
            value_type,
            move |desc, handles| {
                let q = single(inner_inputs::<B>(desc, handles))?;
                let out = B::kv_decode_attention(q, segment.as_ref(), &dense, &shape)?;
                register_outputs::<B>(desc, handles, [out]);
                Ok(())
            },
        );
        single(outputs)
    }

    fn skinny_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        residual: Option<FloatTensor<Self>>,
    ) -> Result<FloatTensor<Self>> {
        let (value_type, shape) = skinny_plan(&x, &w, residual.as_ref())?;
        let client = x.client.clone();
        let inputs = [Some(x), Some(w), residual].into_iter().flatten().collect();
        let outputs = queue::<B, _>(
            &client,
            "sparsekv_skinny_matmul",
            inputs,
            &[vec![shape.m, shape.n]],
            value_type,
            move |desc, handles| {
                let mut inputs = inner_inputs::<B>(desc, handles).into_iter();
                let (Some(x), Some(w)) = (inputs.next(), inputs.next()) else {
                    return Err(KvCacheError::Invalid(
                        "a queued skinny matmul lost its operands".into(),
                    ));
                };
                let out = B::skinny_matmul(x, w, inputs.next())?;
                register_outputs::<B>(desc, handles, [out]);
                Ok(())
            },
        );
        single(outputs)
    }

    fn rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> Result<FloatTensor<Self>> {
        let plan = rms_norm_plan(&x, &weight, eps)?;
        let client = x.client.clone();
        let outputs = queue::<B, _>(
            &client,
            "sparsekv_rms_norm",
            vec![x, weight],
            &[plan.dims],
            plan.value_type,
            move |desc, handles| {
                let mut inputs = inner_inputs::<B>(desc, handles).into_iter();
                let (Some(x), Some(weight)) = (inputs.next(), inputs.next()) else {
                    return Err(KvCacheError::Invalid(
                        "a queued RMSNorm lost its operands".into(),
                    ));
                };
                let out = B::rms_norm(x, weight, eps)?;
                register_outputs::<B>(desc, handles, [out]);
                Ok(())
            },
        );
        single(outputs)
    }

    fn rope_split(
        qkv: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        heads: RopeHeads,
    ) -> Result<[FloatTensor<Self>; 3]> {
        let (value_type, shape) = rope_plan(&qkv, &cos, &sin, heads)?;
        let client = qkv.client.clone();
        let outputs = queue::<B, _>(
            &client,
            "sparsekv_rope_split",
            vec![qkv, cos, sin],
            &rope_output_dims(&shape),
            value_type,
            move |desc, handles| {
                let mut inputs = inner_inputs::<B>(desc, handles).into_iter();
                let (Some(qkv), Some(cos), Some(sin)) =
                    (inputs.next(), inputs.next(), inputs.next())
                else {
                    return Err(KvCacheError::Invalid(
                        "a queued RoPE split lost its operands".into(),
                    ));
                };
                let out = B::rope_split(qkv, cos, sin, heads)?;
                register_outputs::<B>(desc, handles, out);
                Ok(())
            },
        );
        outputs.try_into().map_err(|o: Vec<_>| {
            KvCacheError::Invalid(format!(
                "a queued RoPE split returned {} tensors where three were expected",
                o.len()
            ))
        })
    }

    fn swiglu(gate_up: FloatTensor<Self>) -> Result<FloatTensor<Self>> {
        let plan = swiglu_plan(&gate_up)?;
        let client = gate_up.client.clone();
        let outputs = queue::<B, _>(
            &client,
            "sparsekv_swiglu",
            vec![gate_up],
            &[plan.dims],
            plan.value_type,
            move |desc, handles| {
                let gate_up = single(inner_inputs::<B>(desc, handles))?;
                let out = B::swiglu(gate_up)?;
                register_outputs::<B>(desc, handles, [out]);
                Ok(())
            },
        );
        single(outputs)
    }
}
