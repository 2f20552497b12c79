//! A Llama-family decoder on Burn tensors: RMSNorm, RoPE (interleaved or rotate-half), grouped
//! query attention through a [`KvCache`], SwiGLU feed-forward, tied or untied output.
//!
//! [`Llama::prefill`] runs dense causal attention over the prompt and then hands the prompt's
//! keys and values to the caches (which prune all but their window); [`Llama::decode`] runs
//! one token per sequence, attending through the caches.

use sparsekv_burn::burn::tensor::activation::{silu, softmax};
use sparsekv_burn::burn::tensor::{Int, Tensor, TensorData};
use sparsekv_burn::{KvCache, SparseKvBackend};

use crate::checkpoint::{LayerWeights, LlamaWeights};
use crate::config::{LlamaConfig, RopeStyle};
use crate::error::{LlamaError, Result};

struct Layer<B: SparseKvBackend> {
    attn_norm: Tensor<B, 1>,
    wq: Tensor<B, 2>,
    wk: Tensor<B, 2>,
    wv: Tensor<B, 2>,
    wo: Tensor<B, 2>,
    ffn_norm: Tensor<B, 1>,
    w1: Tensor<B, 2>,
    w2: Tensor<B, 2>,
    w3: Tensor<B, 2>,
}

/// A loaded model on one device.
pub struct Llama<B: SparseKvBackend> {
    config: LlamaConfig,
    device: B::Device,
    embedding: Tensor<B, 2>,
    layers: Vec<Layer<B>>,
    final_norm: Tensor<B, 1>,
    /// `[dim, vocab]`.
    lm_head: Tensor<B, 2>,
    /// `[max_seq, head_dim / 2]`.
    rope_cos: Tensor<B, 2>,
    rope_sin: Tensor<B, 2>,
}

impl<B: SparseKvBackend> std::fmt::Debug for Llama<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama")
            .field("config", &self.config)
            .finish()
    }
}

/// Uploads an `(out, in)` row-major matrix transposed to `[in, out]`, so `x.matmul(w)` applies it.
fn linear<B: SparseKvBackend>(
    w: &[f32],
    out: usize,
    inp: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    Tensor::<B, 2>::from_data(TensorData::new(w.to_vec(), [out, inp]), device).transpose()
}

fn vector<B: SparseKvBackend>(v: &[f32], device: &B::Device) -> Tensor<B, 1> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), device)
}

impl<B: SparseKvBackend> Llama<B> {
    /// Uploads `weights` to `device`.
    pub fn new(weights: &LlamaWeights, device: &B::Device) -> Result<Self> {
        let c = &weights.config;
        let (dim, hd, hidden) = (c.dim, c.head_dim(), c.hidden_dim);
        if hd % 2 != 0 {
            return Err(LlamaError::Invalid(format!(
                "head_dim {hd} must be even for RoPE"
            )));
        }
        let (q_dim, kv_dim) = (c.n_heads * hd, c.n_kv_heads * hd);
        let layer = |w: &LayerWeights| Layer {
            attn_norm: vector(&w.attn_norm, device),
            wq: linear(&w.wq, q_dim, dim, device),
            wk: linear(&w.wk, kv_dim, dim, device),
            wv: linear(&w.wv, kv_dim, dim, device),
            wo: linear(&w.wo, dim, q_dim, device),
            ffn_norm: vector(&w.ffn_norm, device),
            w1: linear(&w.w1, hidden, dim, device),
            w2: linear(&w.w2, dim, hidden, device),
            w3: linear(&w.w3, hidden, dim, device),
        };
        let embedding = Tensor::<B, 2>::from_data(
            TensorData::new(weights.embedding.clone(), [c.vocab_size, dim]),
            device,
        );
        let lm_head = match &weights.classifier {
            Some(w) => linear(w, c.vocab_size, dim, device),
            None => embedding.clone().transpose(),
        };
        let half = hd / 2;
        let (mut cos, mut sin) = (
            Vec::with_capacity(c.max_seq * half),
            Vec::with_capacity(c.max_seq * half),
        );
        for pos in 0..c.max_seq {
            for i in 0..half {
                let freq = 1.0 / (c.rope_theta as f64).powf(2.0 * i as f64 / hd as f64);
                let angle = pos as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(Llama {
            config: c.clone(),
            device: device.clone(),
            embedding,
            layers: weights.layers.iter().map(layer).collect(),
            final_norm: vector(&weights.final_norm, device),
            lm_head,
            rope_cos: Tensor::from_data(TensorData::new(cos, [c.max_seq, half]), device),
            rope_sin: Tensor::from_data(TensorData::new(sin, [c.max_seq, half]), device),
        })
    }

    /// Hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn rms_norm(&self, x: Tensor<B, 3>, w: &Tensor<B, 1>) -> Tensor<B, 3> {
        let ms = x.clone().powf_scalar(2.0).mean_dim(2);
        let dim = self.config.dim;
        x * (ms + self.config.rms_eps as f64).sqrt().recip() * w.clone().reshape([1, 1, dim])
    }

    /// Rotates `x` `[1, n, heads, head_dim]` for positions `pos0 .. pos0 + n`.
    fn rope(&self, x: Tensor<B, 4>, pos0: usize) -> Tensor<B, 4> {
        let [b, n, h, d] = x.dims();
        let half = d / 2;
        let cos = self
            .rope_cos
            .clone()
            .slice([pos0..pos0 + n, 0..half])
            .reshape([1, n, 1, half]);
        let sin = self
            .rope_sin
            .clone()
            .slice([pos0..pos0 + n, 0..half])
            .reshape([1, n, 1, half]);
        match self.config.rope_style {
            RopeStyle::Interleaved => {
                let pairs = x.reshape([b, n, h, half, 2]);
                let x0 = pairs
                    .clone()
                    .slice([0..b, 0..n, 0..h, 0..half, 0..1])
                    .reshape([b, n, h, half]);
                let x1 = pairs
                    .slice([0..b, 0..n, 0..h, 0..half, 1..2])
                    .reshape([b, n, h, half]);
                let o0 = x0.clone() * cos.clone() - x1.clone() * sin.clone();
                let o1 = x0 * sin + x1 * cos;
                Tensor::stack::<5>(vec![o0, o1], 4).reshape([b, n, h, d])
            }
            RopeStyle::RotateHalf => {
                let x0 = x.clone().slice([0..b, 0..n, 0..h, 0..half]);
                let x1 = x.slice([0..b, 0..n, 0..h, half..d]);
                let o0 = x0.clone() * cos.clone() - x1.clone() * sin.clone();
                let o1 = x1 * cos + x0 * sin;
                Tensor::cat(vec![o0, o1], 3)
            }
        }
    }

    fn embed(&self, tokens: &[u32]) -> Result<Tensor<B, 3>> {
        if let Some(&t) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(LlamaError::Invalid(format!(
                "token {t} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let ids =
            Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [tokens.len()]), &self.device);
        Ok(self
            .embedding
            .clone()
            .select(0, ids)
            .reshape([1, tokens.len(), self.config.dim]))
    }

    fn feed_forward(&self, x: Tensor<B, 3>, l: &Layer<B>) -> Tensor<B, 3> {
        let h = self.rms_norm(x.clone(), &l.ffn_norm);
        let gate = silu(h.clone().matmul(l.w1.clone().unsqueeze()));
        let up = h.matmul(l.w3.clone().unsqueeze());
        x + (gate * up).matmul(l.w2.clone().unsqueeze())
    }

    fn logits(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        let [_, n, dim] = x.dims();
        let last = x.slice([0..1, n - 1..n, 0..dim]);
        self.rms_norm(last, &self.final_norm)
            .matmul(self.lm_head.clone().unsqueeze())
            .reshape([1, self.config.vocab_size])
    }

    fn check_caches<C: KvCache<B>>(&self, caches: &[C]) -> Result<()> {
        if caches.len() != self.config.n_layers {
            return Err(LlamaError::Invalid(format!(
                "{} caches for {} layers",
                caches.len(),
                self.config.n_layers
            )));
        }
        Ok(())
    }

    /// Runs the prompt `tokens` (one sequence) with dense causal attention, appends its keys
    /// and values to the (empty) caches, and returns the logits of its last token `[1, vocab]`.
    pub fn prefill<C: KvCache<B>>(&self, tokens: &[u32], caches: &mut [C]) -> Result<Tensor<B, 2>> {
        self.check_caches(caches)?;
        let n = tokens.len();
        if n == 0 || n > self.config.max_seq {
            return Err(LlamaError::Invalid(format!(
                "prompt of {n} tokens; the model takes 1..={}",
                self.config.max_seq
            )));
        }
        let c = &self.config;
        let (h, kvh, hd) = (c.n_heads, c.n_kv_heads, c.head_dim());
        let mut mask = vec![0.0f32; n * n];
        for i in 0..n {
            for j in i + 1..n {
                mask[i * n + j] = -1e30;
            }
        }
        let mask = Tensor::<B, 4>::from_data(TensorData::new(mask, [1, 1, n, n]), &self.device);
        let mut x = self.embed(tokens)?;
        for (l, cache) in self.layers.iter().zip(caches.iter_mut()) {
            let hn = self.rms_norm(x.clone(), &l.attn_norm);
            let q = self
                .rope(
                    hn.clone()
                        .matmul(l.wq.clone().unsqueeze())
                        .reshape([1, n, h, hd]),
                    0,
                )
                .swap_dims(1, 2);
            let k = self
                .rope(
                    hn.clone()
                        .matmul(l.wk.clone().unsqueeze())
                        .reshape([1, n, kvh, hd]),
                    0,
                )
                .swap_dims(1, 2);
            let v = hn
                .matmul(l.wv.clone().unsqueeze())
                .reshape([1, n, kvh, hd])
                .swap_dims(1, 2);
            cache.append(k.clone(), v.clone())?;
            let group = h / kvh;
            let expand = |t: Tensor<B, 4>| {
                t.reshape([1, kvh, 1, n, hd])
                    .repeat_dim(2, group)
                    .reshape([1, h, n, hd])
            };
            let scores =
                q.matmul(expand(k).swap_dims(2, 3)) * (1.0 / (hd as f64).sqrt()) + mask.clone();
            let att = softmax(scores, 3)
                .matmul(expand(v))
                .swap_dims(1, 2)
                .reshape([1, n, h * hd]);
            x = x + att.matmul(l.wo.clone().unsqueeze());
            x = self.feed_forward(x, l);
        }
        Ok(self.logits(x))
    }

    /// Runs one token at position `pos` (one sequence), attending through the caches, and
    /// returns its logits `[1, vocab]`.
    pub fn decode<C: KvCache<B>>(
        &self,
        token: u32,
        pos: usize,
        caches: &mut [C],
    ) -> Result<Tensor<B, 2>> {
        self.check_caches(caches)?;
        if pos >= self.config.max_seq {
            return Err(LlamaError::Invalid(format!(
                "position {pos} is past the model's {} tokens",
                self.config.max_seq
            )));
        }
        let c = &self.config;
        let (h, kvh, hd) = (c.n_heads, c.n_kv_heads, c.head_dim());
        let mut x = self.embed(&[token])?;
        for (l, cache) in self.layers.iter().zip(caches.iter_mut()) {
            let hn = self.rms_norm(x.clone(), &l.attn_norm);
            let q = self
                .rope(
                    hn.clone()
                        .matmul(l.wq.clone().unsqueeze())
                        .reshape([1, 1, h, hd]),
                    pos,
                )
                .reshape([1, h, hd]);
            let k = self
                .rope(
                    hn.clone()
                        .matmul(l.wk.clone().unsqueeze())
                        .reshape([1, 1, kvh, hd]),
                    pos,
                )
                .swap_dims(1, 2);
            let v = hn
                .matmul(l.wv.clone().unsqueeze())
                .reshape([1, 1, kvh, hd])
                .swap_dims(1, 2);
            cache.append(k, v)?;
            let att = cache.attend(q)?.reshape([1, 1, h * hd]);
            x = x + att.matmul(l.wo.clone().unsqueeze());
            x = self.feed_forward(x, l);
        }
        Ok(self.logits(x))
    }
}
