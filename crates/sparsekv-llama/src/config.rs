//! Model hyper-parameters.

/// How rotary position embeddings pair up channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// llama2.c: adjacent pairs `(2i, 2i + 1)`.
    Interleaved,
    /// Hugging Face `rotate_half`: pairs `(i, i + head_dim / 2)`.
    RotateHalf,
}

/// The shape and constants of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Hidden size.
    pub dim: usize,
    /// Feed-forward size.
    pub hidden_dim: usize,
    /// Decoder layers.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// KV heads.
    pub n_kv_heads: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest sequence the model was trained for.
    pub max_seq: usize,
    /// RoPE base.
    pub rope_theta: f32,
    /// RoPE channel pairing.
    pub rope_style: RopeStyle,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
}

impl LlamaConfig {
    /// Elements per head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }
}
