//! CubeCL kernels for sparse KV caches, generic over the float type and the runtime:
//! per-token magnitude prune+compress ([`prune_compress`]) and split-K decode attention over a
//! compressed segment plus a dense window ([`decode_attention`]), whose dense variant is the
//! baseline it is measured against; the causal self-attention of whole prompts on matrix
//! units ([`prefill_attention`]), which a prompt chunk runs over a sparse cache's tokens
//! expanded back to dense rows ([`expand_context`]); [`copy_rows`], which moves dense token rows between stream
//! buffers at ragged per-sequence offsets; [`skinny_matmul`], the weight-streaming matrix
//! product of a decode step's projections (which can apply an RMSNorm or SwiGLU to its
//! activations as it reads them: [`SkinnyInput`]); [`rms_norm`], RMSNorm in one launch;
//! [`rope_split`], rotary embedding fused with the split of a fused QKV projection; and
//! [`swiglu`], the feed-forward gate in one launch.
pub mod activation;
pub mod attention;
pub mod compress;
pub mod error;
pub mod expand;
pub mod norm;
mod reduce;
pub mod rope;
pub mod rows;
pub mod skinny;
mod upload;

pub use activation::swiglu;
pub use attention::{
    AttentionArgs, DecodeKernel, DenseCacheArgs, SparseSegmentArgs, decode_attention,
    decode_attention_with, prefill_attention, prefill_attention_unsupported,
};
pub use compress::{CompressArgs, CompressTarget, prune_compress};
pub use error::{KernelError, Result};
pub use expand::{ExpandArgs, expand_context};
pub use norm::rms_norm;
pub use rope::{RopeShape, RopeStyle, rope_split};
pub use rows::{CopyRowsArgs, copy_rows};
pub use skinny::{
    SkinnyInput, SkinnyKernel, SkinnyShape, SkinnyTuning, skinny_matmul, skinny_matmul_with,
};

/// The CubeCL version the kernels are built with, for callers that create clients.
pub use cubecl;

use cubecl::prelude::*;

/// The float types the kernels run on: `f32`, `half::f16`, `half::bf16`.
pub trait FloatElement: Float + CubeElement {
    /// Bytes per element.
    fn size_bytes() -> usize;
    /// Lower-case name.
    fn name() -> &'static str;
    /// Rounds an f32 to this type.
    fn from_f32(x: f32) -> Self;
    /// Widens to f32 (exact for f16 and bf16).
    fn to_f32(self) -> f32;
}

impl FloatElement for f32 {
    fn size_bytes() -> usize {
        4
    }
    fn name() -> &'static str {
        "f32"
    }
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl FloatElement for half::f16 {
    fn size_bytes() -> usize {
        2
    }
    fn name() -> &'static str {
        "f16"
    }
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

impl FloatElement for half::bf16 {
    fn size_bytes() -> usize {
        2
    }
    fn name() -> &'static str {
        "bf16"
    }
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

/// Whether `client`'s device can run kernels on `F`.
pub fn supports_type<R: Runtime, F: FloatElement>(client: &ComputeClient<R>) -> bool {
    client
        .properties()
        .supports_type(F::as_type_native_unchecked())
}

/// A typed error if `client`'s device cannot run kernels on `F`.
pub(crate) fn check_type_supported<R: Runtime, F: FloatElement>(
    client: &ComputeClient<R>,
) -> Result<()> {
    if supports_type::<R, F>(client) {
        Ok(())
    } else {
        Err(KernelError::UnsupportedType {
            runtime: R::name(client).to_string(),
            dtype: F::name(),
        })
    }
}

/// Elements per vector load: 16 bytes at most and at most the device's widest vector (4 on
/// wgpu, where wider vectors are split by the compiler in ways some indexing patterns of these
/// kernels do not survive), dividing the head dimension and every stride, so that each dense
/// row starts on a whole vector.
pub(crate) fn vector_size(
    elem: usize,
    max_vector: usize,
    head_dim: usize,
    strides: &[usize],
) -> usize {
    let mut vec = (16 / elem).min(max_vector).max(1);
    while vec > 1
        && (!head_dim.is_multiple_of(vec) || strides.iter().any(|s| !s.is_multiple_of(vec)))
    {
        vec /= 2;
    }
    vec
}

/// Which matrix-unit interface a kernel uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MmaApi {
    /// Whole-fragment operations (`cmma`: load, execute, store).
    Fragment,
    /// Per-lane registers (`mma.sync` with `ldmatrix`), CUDA only.
    Registers,
}

/// Whether `client`'s device has `m x n x k` matrix-unit products with `F` operands (A and B,
/// 16-bit floats only) into f32 accumulators (C and D), through `api`.
pub(crate) fn has_mma<R: Runtime, F: FloatElement>(
    client: &ComputeClient<R>,
    api: MmaApi,
    (m, n, k): (usize, usize, usize),
) -> bool {
    use cubecl::ir::{ElemType, FloatKind};
    let operands = match F::name() {
        "f16" => ElemType::Float(FloatKind::F16),
        "bf16" => ElemType::Float(FloatKind::BF16),
        _ => return false,
    };
    let config = cubecl::ir::features::MmaConfig {
        a_type: operands.into(),
        b_type: operands.into(),
        cd_type: ElemType::Float(FloatKind::F32).into(),
        m: m as u32,
        n: n as u32,
        k: k as u32,
    };
    let matmul = &client.features().matmul;
    match api {
        MmaApi::Fragment => matmul.cmma.contains(&config),
        MmaApi::Registers => matmul.mma.contains(&config),
    }
}
