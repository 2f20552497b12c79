//! A Llama-family decoder on Burn tensors: RMSNorm, RoPE (interleaved or rotate-half), grouped
//! query attention through a [`KvCache`], SwiGLU feed-forward, tied or untied output.
//!
//! [`Llama::prefill`] runs dense causal attention over the prompt (the backend's fused prompt
//! attention kernel where it has one, else blocks of queries through Burn's ops) and then hands
//! the prompt's keys and values to the caches (which prune all but their window);
//! [`Llama::decode`] runs one token per sequence, attending through the caches.

use sparsekv_burn::burn::tensor::activation::softmax;
use sparsekv_burn::burn::tensor::{Distribution, Int, Tensor, TensorData, TensorPrimitive};
use sparsekv_burn::{
    KvCache, KvCacheError, PrefillPolicy, RopeHeads, RopeTables, SkinnyInput, SparseKvBackend,
};
use sparsekv_format::{HeadDim, PromptShape};

use crate::checkpoint::{LayerWeights, LlamaWeights};
use crate::config::LlamaConfig;
use crate::error::{LlamaError, Result};

/// One decoder layer. Every matrix is stored `[out, in]` (one row of input weights per output
/// feature, PyTorch's `nn.Linear` layout), the layout the skinny matmul streams; projections
/// that read the same input are fused into one matrix, so a decode step reads each input once
/// and launches once per fused projection.
struct Layer<B: SparseKvBackend> {
    attn_norm: Tensor<B, 1>,
    /// `[q_dim + 2 * kv_dim, dim]`: the query, key and value projections, in that order.
    wqkv: Tensor<B, 2>,
    /// `[dim, q_dim]`.
    wo: Tensor<B, 2>,
    ffn_norm: Tensor<B, 1>,
    /// `[2 * hidden, dim]`: the gate (`w1`) then the up (`w3`) projection.
    w13: Tensor<B, 2>,
    /// `[dim, hidden]`: the down projection.
    w2: Tensor<B, 2>,
}

/// A loaded model on one device.
pub struct Llama<B: SparseKvBackend> {
    config: LlamaConfig,
    device: B::Device,
    embedding: Tensor<B, 2>,
    layers: Vec<Layer<B>>,
    final_norm: Tensor<B, 1>,
    /// `[vocab, dim]` (the embedding itself when tied).
    lm_head: Tensor<B, 2>,
    /// The angle tables `[max_seq, head_dim / 2]` and the heads they rotate.
    rope: RopeTables<B>,
    /// Query rows per block of prefill attention (`None`: the backend's prompt attention
    /// kernel where it has one, else blocks sized from [`PREFILL_SCORE_BUDGET`]).
    prefill_block: Option<usize>,
    /// Token rows the per-token blocks take at a time ([`PROMPT_ROWS`] by default).
    prompt_rows: usize,
}

/// Score elements one block of prefill attention may hold (`batch x heads x block x keys`,
/// f32): 2^26, 256 MB. A prompt of `n` tokens takes blocks of
/// `budget / (batch x heads x n)` queries (at least 16), so prefill memory grows as
/// O(block x n), not O(n^2).
pub const PREFILL_SCORE_BUDGET: usize = 1 << 26;

/// Token rows a prompt's per-token blocks (the QKV projection with RoPE, the feed-forward
/// block) take at a time by default ([`Llama::set_prompt_rows`]). 4096 keeps every transient
/// of a Llama-3-8B prefill at most 332 MB (the gate and up projection: 235 MB), the largest
/// slice CubeCL's pools cut from 1.3 GB pages on an 80 GB device (its page sizes follow the
/// device's memory); a larger one would reserve a 5.3 GB page there.
pub const PROMPT_ROWS: usize = 4096;

impl<B: SparseKvBackend> std::fmt::Debug for Llama<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama")
            .field("config", &self.config)
            .finish()
    }
}

/// Uploads the `(out, in)` row-major matrices `parts` stacked along `out` (the rows of the
/// first, then the second, ...), as one `[Σ out, in]` tensor.
fn linear<B: SparseKvBackend>(parts: &[&[f32]], inp: usize, device: &B::Device) -> Tensor<B, 2> {
    let data: Vec<f32> = parts.iter().flat_map(|p| p.iter().copied()).collect();
    let out = data.len() / inp.max(1);
    Tensor::<B, 2>::from_data(TensorData::new(data, [out, inp]), device)
}

/// RoPE's `cos` and `sin` tables, `[max_seq, head_dim / 2]`, and the model's heads.
fn rope_tables<B: SparseKvBackend>(c: &LlamaConfig, device: &B::Device) -> RopeTables<B> {
    let half = c.head_dim() / 2;
    let (mut cos, mut sin) = (
        Vec::with_capacity(c.max_seq * half),
        Vec::with_capacity(c.max_seq * half),
    );
    for pos in 0..c.max_seq {
        for i in 0..half {
            let angle = pos as f64 * c.rope_inv_freq(i);
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    RopeTables {
        cos: Tensor::from_data(TensorData::new(cos, [c.max_seq, half]), device),
        sin: Tensor::from_data(TensorData::new(sin, [c.max_seq, half]), device),
        heads: RopeHeads {
            q_heads: c.n_heads,
            kv_heads: c.n_kv_heads,
            style: c.rope_style,
        },
    }
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
        let q_dim = c.n_heads * hd;
        // Every device buffer must fit the device before anything is built (the RoPE tables
        // are computed on the host from max_seq: check them before that allocation too).
        let elem = std::mem::size_of::<B::FloatElem>() as u64;
        let limit = B::max_buffer_bytes(device);
        let kv_dim = c.n_kv_heads * hd;
        for (what, rows, cols) in [
            ("the embedding (vocab_size x dim)", c.vocab_size, dim),
            (
                "the fused QKV projection ((n_heads + 2 n_kv_heads) x head_dim x dim)",
                q_dim + 2 * kv_dim,
                dim,
            ),
            (
                "the fused gate and up projection (2 hidden_dim x dim)",
                2 * hidden,
                dim,
            ),
            ("the down projection (dim x hidden_dim)", dim, hidden),
            (
                "each RoPE table (max_seq x head_dim / 2)",
                c.max_seq,
                hd / 2,
            ),
        ] {
            let bytes = (rows as u64)
                .checked_mul(cols as u64)
                .and_then(|n| n.checked_mul(elem))
                .unwrap_or(u64::MAX);
            if bytes > limit {
                return Err(LlamaError::TooLarge {
                    what: what.into(),
                    bytes,
                    limit,
                });
            }
        }
        let layer = |w: &LayerWeights| Layer {
            attn_norm: vector(&w.attn_norm, device),
            wqkv: linear(&[&w.wq, &w.wk, &w.wv], dim, device),
            wo: linear(&[&w.wo], q_dim, device),
            ffn_norm: vector(&w.ffn_norm, device),
            w13: linear(&[&w.w1, &w.w3], dim, device),
            w2: linear(&[&w.w2], hidden, device),
        };
        let embedding = Tensor::<B, 2>::from_data(
            TensorData::new(weights.embedding.clone(), [c.vocab_size, dim]),
            device,
        );
        let lm_head = match &weights.classifier {
            Some(w) => linear(&[w], dim, device),
            None => embedding.clone(),
        };
        Ok(Llama {
            config: c.clone(),
            device: device.clone(),
            embedding,
            layers: weights.layers.iter().map(layer).collect(),
            final_norm: vector(&weights.final_norm, device),
            lm_head,
            rope: rope_tables(c, device),
            prefill_block: None,
            prompt_rows: PROMPT_ROWS,
        })
    }

    /// A model of shape `config` with random weights drawn on `device` (normal, standard
    /// deviation `0.02`; norms 1), in the backend's float type: for benchmarks of real model
    /// shapes without their checkpoints. Its outputs are meaningless text.
    pub fn random(config: &LlamaConfig, device: &B::Device) -> Result<Self> {
        let c = config;
        let hd = c.head_dim();
        if c.n_heads == 0
            || c.n_kv_heads == 0
            || !c.dim.is_multiple_of(c.n_heads)
            || !c.n_heads.is_multiple_of(c.n_kv_heads)
            || !hd.is_multiple_of(2)
        {
            return Err(LlamaError::Invalid(format!(
                "dim {} / {} heads / {} KV heads is not a Llama attention shape with an even head_dim",
                c.dim, c.n_heads, c.n_kv_heads
            )));
        }
        // The weights live as long as the model: persistent memory where the backend has it
        // (exact-size buffers, no pooled page tails left reserved).
        let (layers, embedding, final_norm, lm_head) = B::persistent_memory(device, || {
            let normal = || Distribution::Normal(0.0, 0.02);
            let matrix =
                |rows: usize, cols: usize| Tensor::<B, 2>::random([rows, cols], normal(), device);
            let ones = |n: usize| Tensor::<B, 1>::ones([n], device);
            let (dim, hidden) = (c.dim, c.hidden_dim);
            let (q_dim, kv_dim) = (c.n_heads * hd, c.n_kv_heads * hd);
            let layers: Vec<Layer<B>> = (0..c.n_layers)
                .map(|_| Layer {
                    attn_norm: ones(dim),
                    wqkv: matrix(q_dim + 2 * kv_dim, dim),
                    wo: matrix(dim, q_dim),
                    ffn_norm: ones(dim),
                    w13: matrix(2 * hidden, dim),
                    w2: matrix(dim, hidden),
                })
                .collect();
            (
                layers,
                matrix(c.vocab_size, dim),
                ones(dim),
                matrix(c.vocab_size, dim),
            )
        })?;
        Ok(Llama {
            config: c.clone(),
            device: device.clone(),
            embedding,
            layers,
            final_norm,
            lm_head,
            rope: rope_tables(c, device),
            prefill_block: None,
            prompt_rows: PROMPT_ROWS,
        })
    }

    /// Hyper-parameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Sets the query rows per block of prefill attention, through Burn's matmul and softmax
    /// (`None`, the default: the backend's fused prompt attention kernel,
    /// [`SparseKvBackend::prompt_attention`], where it has one for the model's shape and type,
    /// else blocks sized from [`PREFILL_SCORE_BUDGET`]). Results do not depend on it beyond
    /// rounding; smaller blocks use less memory and launch more.
    pub fn set_prefill_block(&mut self, queries: Option<usize>) {
        self.prefill_block = queries.map(|q| q.max(1));
    }

    /// Sets the token rows a prompt's per-token blocks (the QKV projection with RoPE, the
    /// feed-forward block) take at a time (at least 1; default [`PROMPT_ROWS`]): their
    /// transients hold that many rows. Results do not depend on it beyond rounding.
    pub fn set_prompt_rows(&mut self, rows: usize) {
        self.prompt_rows = rows.max(1);
    }

    /// Causal attention of a whole prompt: `q` `[b, n, h, hd]`, `k` and `v`
    /// `[b, kv_heads, n, hd]`; returns `[b, n, h * hd]`. Through the backend's prompt attention
    /// kernel where it has one (unless blocks were asked for), else [`Self::blocked_attention`].
    fn prefill_attention(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> Result<Tensor<B, 3>> {
        let [b, n, h, hd] = q.dims();
        if self.prefill_block.is_none() {
            let value_type = B::kv_value_type(&q.clone().into_primitive().tensor())?;
            let shape = HeadDim::new(hd)
                .and_then(|d| PromptShape::new(b, n, h, k.dims()[1], d))
                .map_err(KvCacheError::from)?;
            if B::prompt_attention_unsupported(&self.device, value_type, shape).is_none() {
                let out = B::prompt_attention(
                    q.into_primitive().tensor(),
                    k.into_primitive().tensor(),
                    v.into_primitive().tensor(),
                )?;
                return Ok(
                    Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(out)).reshape([
                        b,
                        n,
                        h * hd,
                    ]),
                );
            }
        }
        Ok(self.blocked_attention(q.swap_dims(1, 2), k, v))
    }

    /// Causal attention of a whole prompt, one block of queries at a time: `q` `[b, h, n, hd]`,
    /// `k` and `v` `[b, kv_heads, n, hd]` (each KV head serves its group of query heads by
    /// broadcasting, never repeated in memory). Block `[i0, i1)` scores
    /// `[b, kv_heads, group, i1 - i0, i1]` against the keys it may see. Returns
    /// `[b, n, h * hd]`.
    fn blocked_attention(&self, q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, h, n, hd] = q.dims();
        let kvh = k.dims()[1];
        let group = h / kvh;
        let block = self
            .prefill_block
            .unwrap_or_else(|| (PREFILL_SCORE_BUDGET / (b * h * n).max(1)).max(16))
            .min(n);
        let q = q.reshape([b, kvh, group, n, hd]);
        let k = k.reshape([b, kvh, 1, n, hd]);
        let v = v.reshape([b, kvh, 1, n, hd]);
        let scale = 1.0 / (hd as f64).sqrt();
        let mut blocks = Vec::with_capacity(n.div_ceil(block));
        let mut diagonal: Option<(usize, Tensor<B, 5>)> = None;
        for i0 in (0..n).step_by(block) {
            let i1 = (i0 + block).min(n);
            let c = i1 - i0;
            let qb = q.clone().slice([0..b, 0..kvh, 0..group, i0..i1, 0..hd]);
            let kb = k
                .clone()
                .slice([0..b, 0..kvh, 0..1, 0..i1, 0..hd])
                .expand([b, kvh, group, i1, hd]);
            let vb = v
                .clone()
                .slice([0..b, 0..kvh, 0..1, 0..i1, 0..hd])
                .expand([b, kvh, group, i1, hd]);
            // Query i0 + r sees keys 0..=i0 + r: the keys before the block all (zeros, made on
            // the device), the block's own causally (a c x c mask, uploaded once per size).
            let diag = match &diagonal {
                Some((size, mask)) if *size == c => mask.clone(),
                _ => {
                    let mut mask = vec![0.0f32; c * c];
                    for r in 0..c {
                        for j in r + 1..c {
                            mask[r * c + j] = -1e30;
                        }
                    }
                    let mask = Tensor::<B, 5>::from_data(
                        TensorData::new(mask, [1, 1, 1, c, c]),
                        &self.device,
                    );
                    diagonal = Some((c, mask.clone()));
                    mask
                }
            };
            let mask = if i0 == 0 {
                diag
            } else {
                Tensor::cat(vec![Tensor::zeros([1, 1, 1, c, i0], &self.device), diag], 4)
            };
            let scores = qb.matmul(kb.swap_dims(3, 4)) * scale + mask;
            blocks.push(softmax(scores, 4).matmul(vb));
        }
        Tensor::cat(blocks, 3)
            .reshape([b, h, n, hd])
            .swap_dims(1, 2)
            .reshape([b, n, h * hd])
    }

    /// The RMSNorm (the model's eps, weights `w`) that a projection applies to its input.
    fn normed<'a>(&self, w: &'a Tensor<B, 1>) -> SkinnyInput<&'a Tensor<B, 1>> {
        SkinnyInput::RmsNorm {
            weight: w,
            eps: self.config.rms_eps,
        }
    }

    /// Embeds `tokens` (`b * n` ids, sequence-major) as `[b, n, dim]`.
    fn embed(&self, tokens: &[u32], b: usize, n: usize) -> Result<Tensor<B, 3>> {
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
            .reshape([b, n, self.config.dim]))
    }

    /// `a · wᵀ` for `w` `[out, in]`, where `a` `[b, n, in]` is what `input` makes of `x`: `x`
    /// itself, its RMSNorm, or SwiGLU of `x` `[b, n, 2 in]` (the gate, then the up half);
    /// `[b, n, out]`, plus `residual` `[b, n, out]` when given. A few rows (a decode step, a
    /// short prompt) go through the skinny matmul, which streams the weights once at memory
    /// bandwidth, applies the norm or the activation as it reads `x` and adds the residual,
    /// all in one launch; more rows (a prompt) take the norm or the activation in a launch of
    /// its own, then the backend's prompt matmul (matrix units,
    /// [`SparseKvBackend::prompt_matmul`]).
    fn project(
        &self,
        x: Tensor<B, 3>,
        input: SkinnyInput<&Tensor<B, 1>>,
        w: &Tensor<B, 2>,
        residual: Option<Tensor<B, 3>>,
    ) -> Result<Tensor<B, 3>> {
        let [b, n, width] = x.dims();
        let [out, inp] = w.dims();
        let float = |t| Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(t));
        if b * n <= sparsekv_burn::SKINNY_MAX_ROWS {
            let y = B::skinny_matmul(
                x.reshape([b * n, width]).into_primitive().tensor(),
                input.map(|t| t.clone().into_primitive().tensor()),
                w.clone().into_primitive().tensor(),
                residual.map(|r| r.reshape([b * n, out]).into_primitive().tensor()),
            )?;
            Ok(Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(y)).reshape([b, n, out]))
        } else {
            let x = match input {
                SkinnyInput::Plain => x,
                SkinnyInput::RmsNorm { weight, eps } => float(B::rms_norm(
                    x.into_primitive().tensor(),
                    weight.clone().into_primitive().tensor(),
                    eps as f64,
                )?),
                SkinnyInput::SwiGlu => float(B::swiglu(x.into_primitive().tensor())?),
            };
            let y = B::prompt_matmul(
                x.reshape([b * n, inp]).into_primitive().tensor(),
                w.clone().into_primitive().tensor(),
                residual.map(|r| r.reshape([b * n, out]).into_primitive().tensor()),
            )?;
            Ok(Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(y)).reshape([b, n, out]))
        }
    }

    /// The feed-forward block with its residual, `x` `[b, n, dim]`. A prompt's rows go through
    /// it `prompt_rows` at a time (it is per token, so the result is the same), so its largest
    /// transient, the gate and up projection (`2 * hidden` per row), stays that size
    /// (Llama-3-8B, 32K tokens: 0.23 GB instead of 1.9 GB).
    fn feed_forward(&self, x: Tensor<B, 3>, l: &Layer<B>) -> Result<Tensor<B, 3>> {
        let [b, n, dim] = x.dims();
        let step = self.prompt_rows;
        if b * n <= step {
            return self.feed_forward_rows(x, l);
        }
        let rows = x.reshape([1, b * n, dim]);
        let chunks = (0..b * n)
            .step_by(step)
            .map(|r0| {
                let r1 = (r0 + step).min(b * n);
                self.feed_forward_rows(rows.clone().slice([0..1, r0..r1, 0..dim]), l)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(chunks, 1).reshape([b, n, dim]))
    }

    /// [`Self::feed_forward`] of `x` `[b, n, dim]` in one piece.
    fn feed_forward_rows(&self, x: Tensor<B, 3>, l: &Layer<B>) -> Result<Tensor<B, 3>> {
        // [b, n, 2 * hidden]: the gate, then the up projection, of the normalised x.
        let gate_up = self.project(x.clone(), self.normed(&l.ffn_norm), &l.w13, None)?;
        self.project(gate_up, SkinnyInput::SwiGlu, &l.w2, Some(x))
    }

    /// Logits `[b, vocab]` of `x` `[b, dim]`.
    fn logits(&self, x: Tensor<B, 2>) -> Result<Tensor<B, 2>> {
        let [b, dim] = x.dims();
        Ok(self
            .project(
                x.reshape([1, b, dim]),
                self.normed(&self.final_norm),
                &self.lm_head,
                None,
            )?
            .reshape([b, self.config.vocab_size]))
    }

    /// Queries `[b, n, heads, hd]`, keys and values `[b, kv_heads, n, hd]` of the hidden
    /// states `x` `[b, n, dim]`: one fused projection of their RMSNorm, then one launch that
    /// splits it and rotates queries and keys, token `t` of sequence `s` at position
    /// `starts[s] + t`. A prompt's tokens go through `prompt_rows / b` at a time (per token, so
    /// the result is the same), which keeps the fused projection's transient that size.
    #[allow(clippy::type_complexity)]
    fn qkv(
        &self,
        x: Tensor<B, 3>,
        l: &Layer<B>,
        starts: &[usize],
    ) -> Result<(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)> {
        let [b, n, dim] = x.dims();
        let step = (self.prompt_rows / b).max(1);
        if n <= step {
            return self.qkv_rows(x, l, starts);
        }
        let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
        for t0 in (0..n).step_by(step) {
            let t1 = (t0 + step).min(n);
            let piece_starts: Vec<usize> = starts.iter().map(|s| s + t0).collect();
            let (q, k, v) =
                self.qkv_rows(x.clone().slice([0..b, t0..t1, 0..dim]), l, &piece_starts)?;
            qs.push(q);
            ks.push(k);
            vs.push(v);
        }
        Ok((Tensor::cat(qs, 1), Tensor::cat(ks, 2), Tensor::cat(vs, 2)))
    }

    /// [`Self::qkv`] in one piece.
    fn qkv_rows(
        &self,
        x: Tensor<B, 3>,
        l: &Layer<B>,
        starts: &[usize],
    ) -> Result<(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)> {
        // [b, n, (heads + 2 kv_heads) * hd]
        let qkv = self.project(x, self.normed(&l.attn_norm), &l.wqkv, None)?;
        let [q, k, v] = B::rope_split(
            qkv.into_primitive().tensor(),
            self.rope.cos.clone().into_primitive().tensor(),
            self.rope.sin.clone().into_primitive().tensor(),
            starts,
            self.rope.heads,
        )?;
        let float = |t| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(t));
        Ok((float(q), float(k), float(v)))
    }

    fn check_caches<C: KvCache<B>>(&self, caches: &[C], batch: usize) -> Result<()> {
        if caches.len() != self.config.n_layers {
            return Err(LlamaError::Invalid(format!(
                "{} caches for {} layers",
                caches.len(),
                self.config.n_layers
            )));
        }
        if let Some(c) = caches.iter().find(|c| c.lengths().len() != batch) {
            return Err(LlamaError::Invalid(format!(
                "caches hold {} sequences, the call has {batch}",
                c.lengths().len()
            )));
        }
        Ok(())
    }

    /// Runs the prompt `tokens` (one sequence) with dense causal attention, appends its keys
    /// and values to the (empty) caches, and returns the logits of its last token `[1, vocab]`.
    pub fn prefill<C: KvCache<B>>(&self, tokens: &[u32], caches: &mut [C]) -> Result<Tensor<B, 2>> {
        self.prefill_batch(&[tokens], caches)
    }

    /// Runs a batch of prompts of any lengths (one per cache sequence), appends each prompt's
    /// keys and values to its sequence of the caches, and returns the logits of each prompt's
    /// last token `[batch, vocab]`. The caches' [`PrefillPolicy`] says how: `Exact`, the
    /// prompt attends densely to itself (in blocks of queries) before the caches compress it;
    /// `Streaming`, the prompt goes through the caches a chunk at a time.
    ///
    /// Shorter prompts are padded at the end; causal attention keeps the padding out of every
    /// real token's result, and only the real tokens enter the caches.
    pub fn prefill_batch<C: KvCache<B>>(
        &self,
        prompts: &[&[u32]],
        caches: &mut [C],
    ) -> Result<Tensor<B, 2>> {
        self.check_caches(caches, prompts.len())?;
        if let Some(p) = prompts
            .iter()
            .find(|p| p.is_empty() || p.len() > self.config.max_seq)
        {
            return Err(LlamaError::Invalid(format!(
                "prompt of {} tokens; the model takes 1..={}",
                p.len(),
                self.config.max_seq
            )));
        }
        match caches.first().map(|c| c.prefill_policy()) {
            Some(PrefillPolicy::Streaming { chunk }) => {
                self.prefill_streaming(prompts, caches, chunk.max(1))
            }
            _ => self.prefill_exact(prompts, caches),
        }
    }

    /// [`PrefillPolicy::Exact`]: each layer's attention over the whole (padded) prompt, then
    /// its keys and values into the cache.
    fn prefill_exact<C: KvCache<B>>(
        &self,
        prompts: &[&[u32]],
        caches: &mut [C],
    ) -> Result<Tensor<B, 2>> {
        let b = prompts.len();
        let n = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let c = &self.config;
        let lengths: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        let ids = padded_ids(prompts, 0, n);
        let starts = vec![0; b];
        let mut x = self.embed(&ids, b, n)?;
        for (l, cache) in self.layers.iter().zip(caches.iter_mut()) {
            // q [b, n, h, hd]; k, v [b, kv_heads, n, hd]
            let (q, k, v) = self.qkv(x.clone(), l, &starts)?;
            cache.append_ragged(k.clone(), v.clone(), &lengths)?;
            let att = self.prefill_attention(q, k, v)?;
            x = self.project(att, SkinnyInput::Plain, &l.wo, Some(x))?;
            x = self.feed_forward(x, l)?;
        }
        let last: Vec<i32> = lengths
            .iter()
            .enumerate()
            .map(|(i, &len)| (i * n + len - 1) as i32)
            .collect();
        let last = Tensor::<B, 1, Int>::from_data(TensorData::new(last, [b]), &self.device);
        self.logits(x.reshape([b * n, c.dim]).select(0, last))
    }

    /// [`PrefillPolicy::Streaming`]: `chunk` prompt tokens at a time through every layer; in
    /// each layer the chunk's keys and values go into the cache first, then its queries attend
    /// through the cache ([`KvCache::attend_newest`]), so no layer ever holds more than a
    /// chunk of the prompt dense outside its cache.
    fn prefill_streaming<C: KvCache<B>>(
        &self,
        prompts: &[&[u32]],
        caches: &mut [C],
        chunk: usize,
    ) -> Result<Tensor<B, 2>> {
        let b = prompts.len();
        let n = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let c = &self.config;
        let (h, hd) = (c.n_heads, c.head_dim());
        // The hidden state of each prompt's last token, gathered as the chunks that hold them
        // go by: `(sequence, [1, dim])`.
        let mut last_rows: Vec<(usize, Tensor<B, 2>)> = Vec::with_capacity(b);
        for start in (0..n).step_by(chunk) {
            let end = (start + chunk).min(n);
            let width = end - start;
            // [b]: real tokens of this chunk per sequence (0 once a prompt has ended).
            let counts: Vec<usize> = prompts
                .iter()
                .map(|p| p.len().saturating_sub(start).min(width))
                .collect();
            let ids = padded_ids(prompts, start, end);
            let starts = vec![start; b];
            // [b, width, dim]
            let mut x = self.embed(&ids, b, width)?;
            for (l, cache) in self.layers.iter().zip(caches.iter_mut()) {
                // q [b, width, h, hd]; k, v [b, kv_heads, width, hd]
                let (q, k, v) = self.qkv(x.clone(), l, &starts)?;
                cache.append_ragged(k, v, &counts)?;
                let att = cache.attend_newest(q, &counts)?.reshape([b, width, h * hd]);
                x = self.project(att, SkinnyInput::Plain, &l.wo, Some(x))?;
                x = self.feed_forward(x, l)?;
            }
            let rows = x.reshape([b * width, c.dim]);
            for (s, p) in prompts.iter().enumerate() {
                if (start..end).contains(&(p.len() - 1)) {
                    let row = s * width + p.len() - 1 - start;
                    last_rows.push((s, rows.clone().slice([row..row + 1, 0..c.dim])));
                }
            }
        }
        last_rows.sort_by_key(|(s, _)| *s);
        let last = Tensor::cat(last_rows.into_iter().map(|(_, r)| r).collect(), 0);
        self.logits(last)
    }

    /// Runs one token (one sequence) at the next position of the caches, attending through
    /// them, and returns its logits `[1, vocab]`.
    pub fn decode<C: KvCache<B>>(&self, token: u32, caches: &mut [C]) -> Result<Tensor<B, 2>> {
        self.decode_batch(&[token], &[true], caches)
    }

    /// Runs one token per sequence, attending through the caches, and returns the logits
    /// `[batch, vocab]`. Sequence `s`'s token sits at the position after the tokens its caches
    /// hold (their length: the caches are the one record of positions, so RoPE can never
    /// disagree with what attention sees). Sequences that are not `active` (finished ones in a
    /// batch) add nothing to their caches and their logits are to be ignored.
    pub fn decode_batch<C: KvCache<B>>(
        &self,
        tokens: &[u32],
        active: &[bool],
        caches: &mut [C],
    ) -> Result<Tensor<B, 2>> {
        let b = tokens.len();
        self.check_caches(caches, b)?;
        if active.len() != b {
            return Err(LlamaError::Invalid(format!(
                "{b} tokens and {} activity flags",
                active.len()
            )));
        }
        let positions = caches.first().map(|c| c.lengths()).unwrap_or_default();
        if let Some((l, _)) = caches
            .iter()
            .enumerate()
            .find(|(_, c)| c.lengths() != positions)
        {
            return Err(LlamaError::Invalid(format!(
                "layer {l}'s cache holds {:?} tokens per sequence, layer 0's {positions:?}: every layer must hold the same tokens",
                caches[l].lengths()
            )));
        }
        if let Some(&pos) = positions.iter().find(|&&p| p >= self.config.max_seq) {
            return Err(LlamaError::Invalid(format!(
                "position {pos} is past the model's {} tokens",
                self.config.max_seq
            )));
        }
        let c = &self.config;
        let (h, hd) = (c.n_heads, c.head_dim());
        let counts: Vec<usize> = active.iter().map(|&a| usize::from(a)).collect();
        let mut x = self.embed(tokens, b, 1)?;
        for (l, cache) in self.layers.iter().zip(caches.iter_mut()) {
            // [b, 1, (heads + 2 kv_heads) * hd]; keys and values go straight into the cache.
            let qkv = self.project(x.clone(), self.normed(&l.attn_norm), &l.wqkv, None)?;
            let q = cache.append_qkv(qkv, &self.rope, &counts)?;
            let att = cache.attend(q.reshape([b, h, hd]))?.reshape([b, 1, h * hd]);
            x = self.project(att, SkinnyInput::Plain, &l.wo, Some(x))?;
            x = self.feed_forward(x, l)?;
        }
        self.logits(x.reshape([b, c.dim]))
    }
}

/// Token ids `start..end` of every prompt, sequence-major, each prompt padded past its end with
/// its first token (padding never reaches a real token's result: attention is causal and the
/// caches take only the real tokens).
fn padded_ids(prompts: &[&[u32]], start: usize, end: usize) -> Vec<u32> {
    let mut ids = Vec::with_capacity(prompts.len() * (end - start));
    for p in prompts {
        let real = &p[start.min(p.len())..end.min(p.len())];
        ids.extend_from_slice(real);
        ids.extend(std::iter::repeat_n(p[0], end - start - real.len()));
    }
    ids
}
