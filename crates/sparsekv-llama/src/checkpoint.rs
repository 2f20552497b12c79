//! llama2.c checkpoints (`.bin`): a header of 7 little-endian i32 (dim, hidden_dim, n_layers,
//! n_heads, n_kv_heads, vocab_size, seq_len; a negative vocab_size means an unshared
//! classifier follows), then f32 weights in llama2.c's order, then legacy RoPE tables that
//! are skipped.

use std::path::Path;

use crate::config::{LlamaConfig, RopeStyle};
use crate::error::{ByteReader, Result, read_file};

/// Host copies of one decoder layer's weights, each matrix `(out, in)` row-major as stored.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// RMSNorm before attention, `[dim]`.
    pub attn_norm: Vec<f32>,
    /// Query projection, `[n_heads * head_dim, dim]`.
    pub wq: Vec<f32>,
    /// Key projection, `[n_kv_heads * head_dim, dim]`.
    pub wk: Vec<f32>,
    /// Value projection, `[n_kv_heads * head_dim, dim]`.
    pub wv: Vec<f32>,
    /// Output projection, `[dim, n_heads * head_dim]`.
    pub wo: Vec<f32>,
    /// RMSNorm before the feed-forward, `[dim]`.
    pub ffn_norm: Vec<f32>,
    /// Gate projection, `[hidden_dim, dim]`.
    pub w1: Vec<f32>,
    /// Down projection, `[dim, hidden_dim]`.
    pub w2: Vec<f32>,
    /// Up projection, `[hidden_dim, dim]`.
    pub w3: Vec<f32>,
}

/// Host copies of a whole model's weights.
#[derive(Debug, Clone)]
pub struct LlamaWeights {
    /// Hyper-parameters.
    pub config: LlamaConfig,
    /// Token embeddings, `[vocab_size, dim]`.
    pub embedding: Vec<f32>,
    /// Decoder layers.
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm, `[dim]`.
    pub final_norm: Vec<f32>,
    /// Output projection `[vocab_size, dim]`; `None` when tied to the embeddings.
    pub classifier: Option<Vec<f32>>,
}

/// Loads a llama2.c checkpoint. The header is checked against the file size before any
/// weight is allocated, so a corrupt header gives an error, not an absurd allocation.
pub fn load_llama2c(path: impl AsRef<Path>) -> Result<LlamaWeights> {
    let path = path.as_ref();
    let bytes = read_file(path)?;
    let mut r = ByteReader::new(path, &bytes);
    let mut header = [0i32; 7];
    for (i, name) in [
        "dim",
        "hidden_dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "vocab_size",
        "seq_len",
    ]
    .iter()
    .enumerate()
    {
        header[i] = r.i32(name)?;
    }
    let [dim, hidden, layers, heads, kv_heads, vocab, seq] = header;
    let shared = vocab > 0;
    let positive = |v: i32, name: &str, max: i64| {
        if v <= 0 || v as i64 > max {
            Err(r.malformed(format!("header field {name} = {v} is outside 1..={max}")))
        } else {
            Ok(v as usize)
        }
    };
    let dim = positive(dim, "dim", 1 << 16)?;
    let hidden = positive(hidden, "hidden_dim", 1 << 18)?;
    let layers = positive(layers, "n_layers", 1024)?;
    let heads = positive(heads, "n_heads", 1024)?;
    let kv_heads = positive(kv_heads, "n_kv_heads", 1024)?;
    let vocab = positive(vocab.checked_abs().unwrap_or(0), "vocab_size", 1 << 22)?;
    let seq = positive(seq, "seq_len", 1 << 22)?;
    if dim % heads != 0 || heads % kv_heads != 0 {
        return Err(r.malformed(format!(
            "dim {dim}, n_heads {heads}, n_kv_heads {kv_heads} do not divide"
        )));
    }
    let head_dim = dim / heads;
    let kv_dim = kv_heads * head_dim;
    let per_layer = 2 * dim + 2 * dim * dim + 2 * kv_dim * dim + 3 * hidden * dim;
    let floats = vocab * dim
        + layers * per_layer
        + dim
        + seq * head_dim
        + if shared { 0 } else { vocab * dim };
    if floats * 4 > r.remaining() {
        return Err(r.malformed(format!(
            "truncated: the header needs {} bytes of weights, the file has {} after the header",
            floats * 4,
            r.remaining()
        )));
    }
    let embedding = r.f32s(vocab * dim, "token_embedding")?;
    let mut per = |n: usize, name: &str| -> Result<Vec<Vec<f32>>> {
        (0..layers).map(|_| r.f32s(n, name)).collect()
    };
    let rms_att = per(dim, "rms_att")?;
    let wq = per(dim * dim, "wq")?;
    let wk = per(kv_dim * dim, "wk")?;
    let wv = per(kv_dim * dim, "wv")?;
    let wo = per(dim * dim, "wo")?;
    let rms_ffn = per(dim, "rms_ffn")?;
    let w1 = per(hidden * dim, "w1")?;
    let w2 = per(dim * hidden, "w2")?;
    let w3 = per(hidden * dim, "w3")?;
    let final_norm = r.f32s(dim, "rms_final")?;
    r.take(seq * head_dim * 4, "legacy RoPE tables")?;
    let classifier = if shared {
        None
    } else {
        Some(r.f32s(vocab * dim, "classifier")?)
    };
    let mut layer_weights = Vec::with_capacity(layers);
    let zipped = rms_att
        .into_iter()
        .zip(wq)
        .zip(wk)
        .zip(wv)
        .zip(wo)
        .zip(rms_ffn)
        .zip(w1)
        .zip(w2)
        .zip(w3);
    for ((((((((attn_norm, wq), wk), wv), wo), ffn_norm), w1), w2), w3) in zipped {
        layer_weights.push(LayerWeights {
            attn_norm,
            wq,
            wk,
            wv,
            wo,
            ffn_norm,
            w1,
            w2,
            w3,
        });
    }
    Ok(LlamaWeights {
        config: LlamaConfig {
            dim,
            hidden_dim: hidden,
            n_layers: layers,
            n_heads: heads,
            n_kv_heads: kv_heads,
            vocab_size: vocab,
            max_seq: seq,
            rope_theta: 10000.0,
            rope_style: RopeStyle::Interleaved,
            rope_scaling: None,
            rms_eps: 1e-5,
        },
        embedding,
        layers: layer_weights,
        final_norm,
        classifier,
    })
}
