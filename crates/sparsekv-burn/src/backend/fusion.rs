//! [`SparseKvBackend`] for Burn's `Fusion<B>`, the backend type `burn::backend::Wgpu` and
//! `burn::backend::Cuda` are with Burn's default features, over any `B` that implements the
//! extension (Burn 0.21's idiom for backend extensions under fusion, as in burn-vision).
//!
//! A fused backend runs nothing when an operation is called: it records the operation on the
//! calling thread's fusion stream and runs it, in order, when the stream is flushed (a read,
//! a sync, or a full queue). So every operation of the extension, the cache buffers' too, is
//! queued the same way: a [`CustomOpIr`] naming its input and output tensors, and an
//! [`Operation`] that resolves the inner tensors and calls `B`'s implementation.
//!
//! Buffers are not tensors of the stream, and the stream does not run operations strictly in
//! call order: its optimiser groups operations into blocks by the tensors they share, so two
//! operations that share no tensor may run in either order. Each buffer therefore carries a
//! token ([`FusedKvBuffer`]): a one-element tensor that stands for its latest access. An
//! operation reads the tokens of every buffer it touches and writes a new one that becomes
//! theirs, so the stream sees every buffer's reads and writes as a chain of dependencies
//! and keeps them in call order.
//!
//! Every check that can fail runs when the operation is called (the shared checks of
//! [`super`]: shapes and types are known before anything runs), so bad input still returns a
//! typed error at once. What can only fail when the kernel is launched (a launch the runtime
//! refuses) is recorded, and the caches return it from their next operation
//! ([`crate::runtime::check_device_threads`]).

use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, FloatDType, Shape};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Client, Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use sparsekv_format::{PromptShape, ValueType};
use sparsekv_kernels::{SkinnyInput, SkinnyShape};

use super::{
    CompressTarget, CompressedStreams, ContextLayout, DecodeShape, DenseRows, DeviceMemory,
    RopeHeads, RowCopy, Segment, SparseKvBackend, check_rows, decode_output, projection_plan,
    prompt_plan, rms_norm_plan, rope_append_plan, rope_output_dims, rope_plan, skinny_plan,
    swiglu_plan, value_dtype,
};
use crate::error::{KvCacheError, Result};

/// The inner backend's tensor handles, as a queued operation sees them when it runs.
type Handles<B> =
    HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

/// The float tensor of the inner backend `B`.
type Inner<B> = FloatTensor<B>;

/// A fusion-stream tensor of the inner backend `B`'s runtime.
type Token<B> = FusionTensor<<B as FusionBackend>::FusionRuntime>;

/// A cache buffer on a fused backend: the inner backend's buffer and the token of its latest
/// access (see the module documentation). Clones share both.
pub struct FusedKvBuffer<B: FusionBackend + SparseKvBackend> {
    inner: B::KvBuffer,
    last_access: Arc<Mutex<Option<Token<B>>>>,
}

impl<B: FusionBackend + SparseKvBackend> Clone for FusedKvBuffer<B> {
    fn clone(&self) -> Self {
        FusedKvBuffer {
            inner: self.inner.clone(),
            last_access: self.last_access.clone(),
        }
    }
}

impl<B: FusionBackend + SparseKvBackend> std::fmt::Debug for FusedKvBuffer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FusedKvBuffer({:?})", self.inner)
    }
}

impl<B: FusionBackend + SparseKvBackend> FusedKvBuffer<B> {
    /// The inner backend's buffer.
    pub fn inner(&self) -> &B::KvBuffer {
        &self.inner
    }

    /// The slot holding the token of the buffer's latest access.
    fn slot(&self) -> Result<std::sync::MutexGuard<'_, Option<Token<B>>>> {
        self.last_access.lock().map_err(|_| {
            KvCacheError::Invalid("a cache buffer's access token lock is poisoned".into())
        })
    }

    fn token(&self) -> Result<Option<Token<B>>> {
        Ok(self.slot()?.clone())
    }

    fn set_token(&self, token: Token<B>) -> Result<()> {
        *self.slot()? = Some(token);
        Ok(())
    }
}

/// The inner buffer of a fused one (for mapping argument structs to the inner backend).
fn inner<B: FusionBackend + SparseKvBackend>(buffer: &FusedKvBuffer<B>) -> B::KvBuffer {
    buffer.inner.clone()
}

/// One extension operation waiting on a fusion stream. Its description lists the operation's
/// own inputs, then the access tokens it reads; its own outputs, then the new token. `run` gets
/// the own inputs and outputs and the stream's handles when it runs.
struct Queued<B: FusionBackend, F> {
    desc: CustomOpIr,
    inputs: usize,
    /// Whether the last output is a new access token (the operation touches buffers).
    token: bool,
    device: B::Device,
    run: F,
    // `fn() -> B`: the operation holds no `B`, so it is `Send` and `Sync` whatever `B` is.
    _backend: PhantomData<fn() -> B>,
}

impl<B: FusionBackend, F> std::fmt::Debug for Queued<B, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Queued({})", self.desc.id)
    }
}

impl<B, F> Operation<B::FusionRuntime> for Queued<B, F>
where
    B: FusionBackend + SparseKvBackend,
    F: Fn(&[TensorIr], &[TensorIr], &mut Handles<B>) -> Result<()> + Send + Sync + 'static,
{
    fn execute(&self, handles: &mut Handles<B>) {
        let (own_inputs, tokens) = self.desc.inputs.split_at(self.inputs);
        let own_outputs = match self.desc.outputs.split_last() {
            Some((token_out, own)) if self.token => {
                // The new token is an old one passed on (or a fresh one for a buffer's first
                // access): the stream must find a handle for it whatever `run` does.
                let mut carried = None;
                for ir in tokens {
                    let t = handles.get_float_tensor::<B>(ir);
                    carried.get_or_insert(t);
                }
                let token = carried.unwrap_or_else(|| {
                    B::float_zeros(Shape::new([1]), &self.device, FloatDType::F32)
                });
                handles.register_float_tensor::<B>(&token_out.id, token);
                own
            }
            _ => &self.desc.outputs,
        };
        if let Err(error) = (self.run)(own_inputs, own_outputs, handles) {
            crate::runtime::record_queued_failure(&self.desc.id, &error);
        }
    }
}

/// Queues `run` on the calling thread's fusion stream of `client` as the operation `name`,
/// reading `inputs`, writing new tensors of the given shapes and type (returned), and touching
/// `buffers` (ordered after every earlier operation on them, and before every later one).
#[allow(clippy::too_many_arguments)]
fn queue<B, F>(
    client: &Client<B::FusionRuntime>,
    name: &'static str,
    inputs: Vec<Token<B>>,
    outputs: &[Vec<usize>],
    value_type: ValueType,
    buffers: &[&FusedKvBuffer<B>],
    run: F,
) -> Result<Vec<Token<B>>>
where
    B: FusionBackend + SparseKvBackend,
    F: Fn(&[TensorIr], &[TensorIr], &mut Handles<B>) -> Result<()> + Send + Sync + 'static,
{
    let own_inputs = inputs.len();
    let mut reads = inputs;
    for buffer in buffers {
        if let Some(token) = buffer.token()?
            && !reads.iter().any(|t| t.id == token.id)
        {
            reads.push(token);
        }
    }
    let streams = OperationStreams::with_inputs(reads.iter());
    let inputs: Vec<TensorIr> = reads.into_iter().map(FusionTensor::into_ir).collect();
    let uninit = |dims: Vec<usize>, dtype| {
        TensorIr::uninit(client.create_empty_handle(), Shape::from(dims), dtype)
    };
    let mut outputs: Vec<TensorIr> = outputs
        .iter()
        .map(|dims| uninit(dims.clone(), value_dtype(value_type)))
        .collect();
    let token = !buffers.is_empty();
    if token {
        outputs.push(uninit(vec![1], DType::F32));
    }
    let desc = CustomOpIr::new(name, &inputs, &outputs);
    let operation = Queued::<B, F> {
        desc: desc.clone(),
        inputs: own_inputs,
        token,
        device: client.device().clone(),
        run,
        _backend: PhantomData,
    };
    let mut results = client.register(streams, OperationIr::Custom(desc), operation);
    if token {
        let token = results.pop().ok_or_else(|| {
            KvCacheError::Invalid(format!(
                "the queued operation {name} returned no access token"
            ))
        })?;
        for buffer in buffers {
            buffer.set_token(token.clone())?;
        }
    }
    Ok(results)
}

/// The inner tensors of a queued operation's own inputs, in order.
fn inner_inputs<B: FusionBackend>(inputs: &[TensorIr], handles: &mut Handles<B>) -> Vec<Inner<B>> {
    inputs
        .iter()
        .map(|ir| handles.get_float_tensor::<B>(ir))
        .collect()
}

/// A queued RoPE operation's operands on the inner backend: the fused QKV rows and the two
/// angle tables.
fn rope_inputs<B: FusionBackend>(
    inputs: &[TensorIr],
    handles: &mut Handles<B>,
) -> Result<[Inner<B>; 3]> {
    inner_inputs::<B>(inputs, handles)
        .try_into()
        .map_err(|_| KvCacheError::Invalid("a queued RoPE operation lost its operands".into()))
}

/// The inner backend's `a · wᵀ (+ residual)` of activations `x` (`a` as the input says): its
/// skinny or its prompt matmul.
type Projection<B> =
    fn(Inner<B>, SkinnyInput<Inner<B>>, Inner<B>, Option<Inner<B>>) -> Result<Inner<B>>;

/// Queues the projection `name`, `a · wᵀ (+ residual)` of checked `shape`, that `run` (the
/// inner backend's skinny or prompt matmul) computes when the stream gets to it.
fn queue_projection<B: FusionBackend + SparseKvBackend>(
    name: &'static str,
    [x, w]: [Token<B>; 2],
    input: SkinnyInput<Token<B>>,
    residual: Option<Token<B>>,
    value_type: ValueType,
    shape: SkinnyShape,
    run: Projection<B>,
) -> Result<Token<B>> {
    let client = x.client.clone();
    let has_residual = residual.is_some();
    // What the input is, without its weights (they are queued as the last input).
    let kind = input.as_ref().map(|_| ());
    let norm_weight = match input {
        SkinnyInput::RmsNorm { weight, .. } => Some(weight),
        _ => None,
    };
    let inputs = [Some(x), Some(w), residual, norm_weight]
        .into_iter()
        .flatten()
        .collect();
    let outputs = queue::<B, _>(
        &client,
        name,
        inputs,
        &[vec![shape.m, shape.n]],
        value_type,
        &[],
        move |inputs, outputs, handles| {
            let mut inputs = inner_inputs::<B>(inputs, handles).into_iter();
            let (Some(x), Some(w)) = (inputs.next(), inputs.next()) else {
                return Err(KvCacheError::Invalid(format!(
                    "a queued {name} lost its operands"
                )));
            };
            let residual = if has_residual { inputs.next() } else { None };
            let input = match kind {
                SkinnyInput::RmsNorm { eps, .. } => match inputs.next() {
                    Some(weight) => SkinnyInput::RmsNorm { weight, eps },
                    None => {
                        return Err(KvCacheError::Invalid(format!(
                            "a queued {name} lost its norm weights"
                        )));
                    }
                },
                SkinnyInput::Plain => SkinnyInput::Plain,
                SkinnyInput::SwiGlu => SkinnyInput::SwiGlu,
            };
            let out = run(x, input, w, residual)?;
            register_outputs::<B>(outputs, handles, [out]);
            Ok(())
        },
    )?;
    single(outputs)
}

/// Hands a queued operation's results to the stream as its own output tensors.
fn register_outputs<B: FusionBackend>(
    outputs: &[TensorIr],
    handles: &mut Handles<B>,
    results: impl IntoIterator<Item = Inner<B>>,
) {
    for (ir, tensor) in outputs.iter().zip(results) {
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
    type KvBuffer = FusedKvBuffer<B>;

    fn kv_alloc(device: &Self::Device, bytes: usize) -> Result<Self::KvBuffer> {
        // Allocation needs no order: nothing reads the buffer before a queued write.
        Ok(FusedKvBuffer {
            inner: B::kv_alloc(device, bytes)?,
            last_access: Arc::new(Mutex::new(None)),
        })
    }

    fn kv_buffer_bytes(buffer: &Self::KvBuffer) -> usize {
        B::kv_buffer_bytes(&buffer.inner)
    }

    fn kv_view(buffer: &Self::KvBuffer, offset: usize, bytes: usize) -> Result<Self::KvBuffer> {
        // The view shares the whole buffer's access token: every operation on any part of it
        // stays in the order it was called (the parts overlap the whole).
        Ok(FusedKvBuffer {
            inner: B::kv_view(&buffer.inner, offset, bytes)?,
            last_access: buffer.last_access.clone(),
        })
    }

    fn max_buffer_bytes(device: &Self::Device) -> u64 {
        B::max_buffer_bytes(device)
    }

    fn device_memory(device: &Self::Device) -> Option<DeviceMemory> {
        B::device_memory(device)
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
        let touched: Vec<&FusedKvBuffer<B>> = pairs.iter().map(|(_, b)| *b).collect();
        let buffers: Vec<B::KvBuffer> = touched.iter().map(|b| inner(b)).collect();
        let copy = copy.clone();
        queue::<B, _>(
            &client,
            "sparsekv_write_rows",
            tensors,
            &[],
            value_type,
            &touched,
            move |inputs, _, handles| {
                let rows = inner_inputs::<B>(inputs, handles);
                let pairs: Vec<_> = rows.into_iter().zip(&buffers).collect();
                B::kv_write_rows(&pairs, value_type, &copy)
            },
        )?;
        Ok(())
    }

    fn kv_copy_rows(
        device: &Self::Device,
        pairs: &[(&Self::KvBuffer, &Self::KvBuffer)],
        value_type: ValueType,
        copy: &RowCopy,
    ) -> Result<()> {
        let device = device.clone();
        let touched: Vec<&FusedKvBuffer<B>> =
            pairs.iter().flat_map(|(src, dst)| [*src, *dst]).collect();
        let buffers: Vec<(B::KvBuffer, B::KvBuffer)> = pairs
            .iter()
            .map(|(src, dst)| (inner(src), inner(dst)))
            .collect();
        let copy = copy.clone();
        queue::<B, _>(
            &burn_fusion::get_client::<B>(&device),
            "sparsekv_copy_rows",
            Vec::new(),
            &[],
            value_type,
            &touched,
            move |_, _, _| {
                let pairs: Vec<_> = buffers.iter().map(|(s, d)| (s, d)).collect();
                B::kv_copy_rows(&device, &pairs, value_type, &copy)
            },
        )?;
        Ok(())
    }

    fn kv_prune_compress(
        device: &Self::Device,
        targets: &[CompressTarget<Self>],
        value_type: ValueType,
        rows: &RowCopy,
    ) -> Result<()> {
        let device = device.clone();
        let touched: Vec<_> = targets
            .iter()
            .flat_map(|t| [&t.src, &t.dest.bitmap, &t.dest.values])
            .collect();
        let inner_targets: Vec<_> = targets.iter().map(|t| t.map_buffers::<B>(inner)).collect();
        let rows = rows.clone();
        queue::<B, _>(
            &burn_fusion::get_client::<B>(&device),
            "sparsekv_prune_compress",
            Vec::new(),
            &[],
            value_type,
            &touched,
            move |_, _, _| B::kv_prune_compress(&device, &inner_targets, value_type, &rows),
        )?;
        Ok(())
    }

    fn kv_compress_rows(
        sources: Vec<(FloatTensor<Self>, CompressedStreams<Self>)>,
        value_type: ValueType,
        rows: &RowCopy,
    ) -> Result<()> {
        check_rows(sources.iter().map(|(t, _)| t), value_type)?;
        let Some(client) = sources.first().map(|(t, _)| t.client.clone()) else {
            return Ok(());
        };
        let (tensors, outer): (Vec<_>, Vec<_>) = sources.into_iter().unzip();
        let touched: Vec<_> = outer.iter().flat_map(|d| [&d.bitmap, &d.values]).collect();
        let dests: Vec<_> = outer.iter().map(|d| d.map_buffers::<B>(inner)).collect();
        let rows = rows.clone();
        queue::<B, _>(
            &client,
            "sparsekv_compress_rows",
            tensors,
            &[],
            value_type,
            &touched,
            move |inputs, _, handles| {
                let sources = inner_inputs::<B>(inputs, handles)
                    .into_iter()
                    .zip(dests.iter().cloned())
                    .collect();
                B::kv_compress_rows(sources, value_type, &rows)
            },
        )?;
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
        let mut touched = vec![&dense.k, &dense.v];
        if let Some(s) = segment {
            touched.extend([&s.k_bitmap, &s.k_values, &s.v_bitmap, &s.v_values]);
        }
        let inner_segment = segment.map(|s| s.map_buffers::<B>(inner));
        let inner_dense = dense.map_buffers::<B>(inner);
        let shape = shape.clone();
        let outputs = queue::<B, _>(
            &client,
            "sparsekv_decode_attention",
            vec![q],
            &[out_dims],
            value_type,
            &touched,
            move |inputs, outputs, handles| {
                let q = single(inner_inputs::<B>(inputs, handles))?;
                let out = B::kv_decode_attention(q, inner_segment.as_ref(), &inner_dense, &shape)?;
                register_outputs::<B>(outputs, handles, [out]);
                Ok(())
            },
        )?;
        single(outputs)
    }

    fn skinny_matmul(
        x: FloatTensor<Self>,
        input: SkinnyInput<FloatTensor<Self>>,
        w: FloatTensor<Self>,
        residual: Option<FloatTensor<Self>>,
    ) -> Result<FloatTensor<Self>> {
        let (value_type, shape) = skinny_plan(&x, &input, &w, residual.as_ref())?;
        queue_projection::<B>(
            "sparsekv_skinny_matmul",
            [x, w],
            input,
            residual,
            value_type,
            shape,
            B::skinny_matmul,
        )
    }

    fn prompt_matmul(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        residual: Option<FloatTensor<Self>>,
    ) -> Result<FloatTensor<Self>> {
        let (value_type, shape) = projection_plan(&x, &w, residual.as_ref())?;
        queue_projection::<B>(
            "sparsekv_prompt_matmul",
            [x, w],
            SkinnyInput::Plain,
            residual,
            value_type,
            shape,
            |x, _plain, w, residual| B::prompt_matmul(x, w, residual),
        )
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
            &[],
            move |inputs, outputs, handles| {
                let mut inputs = inner_inputs::<B>(inputs, handles).into_iter();
                let (Some(x), Some(weight)) = (inputs.next(), inputs.next()) else {
                    return Err(KvCacheError::Invalid(
                        "a queued RMSNorm lost its operands".into(),
                    ));
                };
                let out = B::rms_norm(x, weight, eps)?;
                register_outputs::<B>(outputs, handles, [out]);
                Ok(())
            },
        )?;
        single(outputs)
    }

    fn rope_split(
        qkv: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        starts: &[usize],
        heads: RopeHeads,
    ) -> Result<[FloatTensor<Self>; 3]> {
        let (value_type, shape) = rope_plan(&qkv, &cos, &sin, starts, heads)?;
        let starts = starts.to_vec();
        let client = qkv.client.clone();
        let outputs = queue::<B, _>(
            &client,
            "sparsekv_rope_split",
            vec![qkv, cos, sin],
            &rope_output_dims(&shape),
            value_type,
            &[],
            move |inputs, outputs, handles| {
                let [qkv, cos, sin] = rope_inputs::<B>(inputs, handles)?;
                let out = B::rope_split(qkv, cos, sin, &starts, heads)?;
                register_outputs::<B>(outputs, handles, out);
                Ok(())
            },
        )?;
        outputs.try_into().map_err(|o: Vec<_>| {
            KvCacheError::Invalid(format!(
                "a queued RoPE split returned {} tensors where three were expected",
                o.len()
            ))
        })
    }

    fn rope_append(
        qkv: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        starts: &[usize],
        heads: RopeHeads,
        window: [&Self::KvBuffer; 2],
        value_type: ValueType,
        copy: &RowCopy,
    ) -> Result<FloatTensor<Self>> {
        let shape = rope_append_plan(&qkv, &cos, &sin, starts, heads, value_type)?;
        let [q_dims, _, _] = rope_output_dims(&shape);
        let (starts, copy) = (starts.to_vec(), copy.clone());
        let buffers = window.map(inner);
        let client = qkv.client.clone();
        let outputs = queue::<B, _>(
            &client,
            "sparsekv_rope_append",
            vec![qkv, cos, sin],
            &[q_dims],
            value_type,
            &window,
            move |inputs, outputs, handles| {
                let [qkv, cos, sin] = rope_inputs::<B>(inputs, handles)?;
                let [k, v] = &buffers;
                let q = B::rope_append(qkv, cos, sin, &starts, heads, [k, v], value_type, &copy)?;
                register_outputs::<B>(outputs, handles, [q]);
                Ok(())
            },
        )?;
        outputs
            .into_iter()
            .next()
            .ok_or_else(|| KvCacheError::Invalid("a queued RoPE append returned no queries".into()))
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
            &[],
            move |inputs, outputs, handles| {
                let gate_up = single(inner_inputs::<B>(inputs, handles))?;
                let out = B::swiglu(gate_up)?;
                register_outputs::<B>(outputs, handles, [out]);
                Ok(())
            },
        )?;
        single(outputs)
    }

    fn kv_expand_context(
        device: &Self::Device,
        segment: &Segment<Self>,
        window: &DenseRows<Self>,
        layout: &ContextLayout,
    ) -> Result<[FloatTensor<Self>; 2]> {
        let device = device.clone();
        let touched = [
            &segment.k_bitmap,
            &segment.k_values,
            &segment.v_bitmap,
            &segment.v_values,
            &window.k,
            &window.v,
        ];
        let (inner_segment, inner_window) = (
            segment.map_buffers::<B>(inner),
            window.map_buffers::<B>(inner),
        );
        let dims = layout.dims();
        let layout = layout.clone();
        let run_on = device.clone();
        let outputs = queue::<B, _>(
            &burn_fusion::get_client::<B>(&device),
            "sparsekv_expand_context",
            Vec::new(),
            &[dims.clone(), dims],
            layout.value_type,
            &touched,
            move |_, outputs, handles| {
                let kv = B::kv_expand_context(&run_on, &inner_segment, &inner_window, &layout)?;
                register_outputs::<B>(outputs, handles, kv);
                Ok(())
            },
        )?;
        let n = outputs.len();
        <[FloatTensor<Self>; 2]>::try_from(outputs).map_err(|_| {
            KvCacheError::Invalid(format!(
                "the queued context expansion returned {n} tensors, not 2"
            ))
        })
    }

    fn prompt_attention_unsupported(
        device: &Self::Device,
        value_type: ValueType,
        shape: PromptShape,
    ) -> Option<String> {
        B::prompt_attention_unsupported(device, value_type, shape)
    }

    fn prompt_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
    ) -> Result<FloatTensor<Self>> {
        let plan = prompt_plan(&q, &k, &v)?;
        // Refused here, at the call, rather than when the stream runs it.
        if let Some(why) =
            B::prompt_attention_unsupported(q.client.device(), plan.value_type, plan.shape)
        {
            return Err(sparsekv_kernels::KernelError::Unsupported(why).into());
        }
        let client = q.client.clone();
        let outputs = queue::<B, _>(
            &client,
            "sparsekv_prompt_attention",
            vec![q, k, v],
            &[plan.dims],
            plan.value_type,
            &[],
            move |inputs, outputs, handles| {
                let mut inputs = inner_inputs::<B>(inputs, handles).into_iter();
                let (Some(q), Some(k), Some(v)) = (inputs.next(), inputs.next(), inputs.next())
                else {
                    return Err(KvCacheError::Invalid(
                        "a queued prompt attention lost its operands".into(),
                    ));
                };
                let out = B::prompt_attention(q, k, v)?;
                register_outputs::<B>(outputs, handles, [out]);
                Ok(())
            },
        )?;
        single(outputs)
    }
}
