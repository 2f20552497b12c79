//! A KV cache that simulates pruning strategies by masking, for accuracy evaluation.
//!
//! [`MaskedKvCache`] keeps every token dense on the device and a copy on the host. When tokens
//! leave the dense window it decides, on the host with the f64 oracle's definitions
//! ([`sparsekv_format::oracle::strategies`]), which of their elements a [`PruneStrategy`] keeps,
//! zeroes the others and writes the rows back; attention then runs densely over the masked
//! rows. It follows exactly the window and chunk policy of [`SparseKvCache`](crate::SparseKvCache),
//! so for [`PruneStrategy::PerTokenMagnitude`] it attends to the same values as the compressed
//! cache, through the dense kernel instead of the compressed one.
//!
//! It is slow (a host round trip per append) and stores nothing compressed: it exists to
//! compare strategies the format cannot store, not to save memory.

use std::collections::VecDeque;
use std::sync::Mutex;

use burn::tensor::{Tensor, TensorData};
use sparsekv_format::oracle::DenseBlock;
use sparsekv_format::oracle::strategies::{
    self, Mask, attention_mass, key_channel_weights, think_keys,
};
use sparsekv_format::{HeadDim, KvBytes, Sparsity};

use crate::backend::{RowCopy, SparseKvBackend};
use crate::cache::{
    DenseKvCache, KvCache, KvCacheConfig, PrefillPolicy, prompt_excess, room_to_make,
};
use crate::error::{KvCacheError, Result};

/// Tokens per channel group of the per-channel strategies (the paper's 32).
pub const CHANNEL_GROUP: usize = 32;

/// Recent decode steps whose queries score keys and values for the output-aware strategies
/// and ThinK.
pub const RECENT_QUERIES: usize = 32;

/// How the tokens leaving the dense window are pruned (docs: `oracle::strategies`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PruneStrategy {
    /// Each row keeps its largest `|x|`: sparsekv's format (the compressed cache's rule).
    PerTokenMagnitude,
    /// Each row keeps its top `|q̄_c · K[t,c]|` (keys) or `a_t · |V[t,c]|` (values).
    PerTokenOutputAware,
    /// Within groups of [`CHANNEL_GROUP`] tokens, each channel keeps its largest `|x|`.
    PerChannelMagnitude,
    /// As per-channel magnitude, with the output-aware scores.
    PerChannelOutputAware,
    /// ThinK: drops the key channels with the lowest `mean(q_c²) · mean_t(K[t,c]²)` for every
    /// pruned token. Keys only.
    ThinkKeys,
}

impl PruneStrategy {
    /// Every strategy, per-token magnitude first.
    pub const ALL: [PruneStrategy; 5] = [
        PruneStrategy::PerTokenMagnitude,
        PruneStrategy::PerTokenOutputAware,
        PruneStrategy::PerChannelMagnitude,
        PruneStrategy::PerChannelOutputAware,
        PruneStrategy::ThinkKeys,
    ];

    /// A human-readable name.
    pub fn name(self) -> &'static str {
        match self {
            PruneStrategy::PerTokenMagnitude => "per-token magnitude",
            PruneStrategy::PerTokenOutputAware => "per-token output-aware",
            PruneStrategy::PerChannelMagnitude => "per-channel magnitude",
            PruneStrategy::PerChannelOutputAware => "per-channel output-aware",
            PruneStrategy::ThinkKeys => "ThinK (key channels)",
        }
    }

    /// Whether the strategy can prune values (ThinK prunes key channels only).
    pub fn prunes_values(self) -> bool {
        self != PruneStrategy::ThinkKeys
    }

    /// Whether the strategy scores with the recent queries.
    pub fn uses_queries(self) -> bool {
        matches!(
            self,
            PruneStrategy::PerTokenOutputAware
                | PruneStrategy::PerChannelOutputAware
                | PruneStrategy::ThinkKeys
        )
    }
}

/// A dense-storage KV cache for one layer that prunes by mask with any [`PruneStrategy`]
/// (module docs).
pub struct MaskedKvCache<B: SparseKvBackend> {
    config: KvCacheConfig,
    strategy: PruneStrategy,
    head_dim: HeadDim,
    k_sparsity: Sparsity,
    v_sparsity: Sparsity,
    dense: DenseKvCache<B>,
    /// Host copy of what attention sees, per stream (`sequence * kv_heads + head`),
    /// `[tokens, head_dim]` row-major.
    host_k: Vec<Vec<f64>>,
    host_v: Vec<Vec<f64>>,
    /// Tokens pruned so far, per sequence (the oldest ones).
    pruned: Vec<usize>,
    /// Per sequence, the queries (`[q_heads * head_dim]`) of the most recent decode steps.
    recent: Mutex<Vec<VecDeque<Vec<f64>>>>,
}

impl<B: SparseKvBackend> std::fmt::Debug for MaskedKvCache<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MaskedKvCache")
            .field("config", &self.config)
            .field("strategy", &self.strategy)
            .field("pruned", &self.pruned)
            .finish()
    }
}

/// Reads a float tensor to the host as f64.
fn host_values<B: SparseKvBackend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f64>> {
    let data = t
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| KvCacheError::Invalid(format!("reading a tensor to the host: {e:?}")))?;
    Ok(data.into_iter().map(f64::from).collect())
}

impl<B: SparseKvBackend> MaskedKvCache<B> {
    /// Allocates a cache for `config` on `device` that prunes with `strategy`.
    pub fn new(
        config: &KvCacheConfig,
        strategy: PruneStrategy,
        device: &B::Device,
    ) -> Result<Self> {
        let dense = DenseKvCache::new(config, device)?;
        let k_sparsity = Sparsity::new(config.k_sparsity)?;
        let v_sparsity = Sparsity::new(config.v_sparsity)?;
        if !strategy.prunes_values() && v_sparsity.get() > 0.0 {
            return Err(KvCacheError::Invalid(format!(
                "{} prunes keys only; set the value sparsity to 0 (got {})",
                strategy.name(),
                config.v_sparsity
            )));
        }
        let streams = config.batch * config.kv_heads;
        Ok(MaskedKvCache {
            config: config.clone(),
            strategy,
            head_dim: HeadDim::new(config.head_dim)?,
            k_sparsity,
            v_sparsity,
            dense,
            host_k: vec![Vec::new(); streams],
            host_v: vec![Vec::new(); streams],
            pruned: vec![0; config.batch],
            recent: Mutex::new(vec![VecDeque::new(); config.batch]),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &KvCacheConfig {
        &self.config
    }

    /// The strategy.
    pub fn strategy(&self) -> PruneStrategy {
        self.strategy
    }

    fn held(&self, sequence: usize) -> usize {
        self.host_k[sequence * self.config.kv_heads].len() / self.head_dim.get()
    }

    /// Queries of the recent steps for KV head `head` of `sequence`, `[rows, head_dim]` (each
    /// step's query heads of that head's group), and the number of steps they come from.
    fn recent_queries(&self, sequence: usize, head: usize) -> Result<(Vec<f64>, usize)> {
        let recent = self
            .recent
            .lock()
            .map_err(|_| KvCacheError::Invalid("query history lock poisoned".into()))?;
        let d = self.head_dim.get();
        let mut rows = Vec::new();
        for step in &recent[sequence] {
            let group = step.len() / d / self.config.kv_heads;
            rows.extend_from_slice(&step[head * group * d..(head + 1) * group * d]);
        }
        Ok((rows, recent[sequence].len()))
    }

    /// The mask of `block` (tokens `start..` of stream `sequence, head`) for keys or values,
    /// at sparsity `s`.
    fn mask(
        &self,
        sequence: usize,
        head: usize,
        start: usize,
        block: &DenseBlock,
        keys: bool,
        s: Sparsity,
    ) -> Result<Mask> {
        let (queries, steps) = if self.strategy.uses_queries() {
            self.recent_queries(sequence, head)?
        } else {
            (Vec::new(), 0)
        };
        // Before any decode step (pruning a prompt) there are no queries to score with: the
        // output-aware strategies fall back to their magnitude counterparts, ThinK to all
        // channels weighted alike.
        let strategy = match self.strategy {
            PruneStrategy::PerTokenOutputAware if steps == 0 => PruneStrategy::PerTokenMagnitude,
            PruneStrategy::PerChannelOutputAware if steps == 0 => {
                PruneStrategy::PerChannelMagnitude
            }
            other => other,
        };
        let d = self.head_dim.get();
        let mask = match strategy {
            PruneStrategy::PerTokenMagnitude => strategies::per_token_magnitude(block, s),
            PruneStrategy::PerChannelMagnitude => {
                strategies::per_channel_magnitude(block, s, CHANNEL_GROUP)?
            }
            PruneStrategy::ThinkKeys => {
                let q = if steps == 0 { vec![1.0; d] } else { queries };
                think_keys(block, &q, s)?
            }
            PruneStrategy::PerTokenOutputAware | PruneStrategy::PerChannelOutputAware => {
                let per_token = strategy == PruneStrategy::PerTokenOutputAware;
                if keys {
                    let group = queries.len() / steps / d;
                    let q_bar = key_channel_weights(&queries, steps, group, d)?;
                    if per_token {
                        strategies::per_token_output_aware_keys(block, &q_bar, s)?
                    } else {
                        strategies::per_channel_output_aware_keys(block, &q_bar, s, CHANNEL_GROUP)?
                    }
                } else {
                    // Attention mass over everything the stream holds now, as attention sees it.
                    let stream = sequence * self.config.kv_heads + head;
                    let held = self.host_k[stream].len() / d;
                    let all_keys =
                        DenseBlock::new(self.host_k[stream].clone(), held, self.head_dim)?;
                    let mass = attention_mass(&queries, &all_keys)?;
                    let mass = &mass[start..start + block.tokens()];
                    if per_token {
                        strategies::per_token_output_aware_values(block, mass, s)?
                    } else {
                        strategies::per_channel_output_aware_values(block, mass, s, CHANNEL_GROUP)?
                    }
                }
            }
        };
        Ok(mask)
    }

    /// Prunes tokens `pruned[s] .. pruned[s] + counts[s]` of every stream of each sequence in
    /// the host copy.
    fn prune_oldest(&mut self, counts: &[usize]) -> Result<()> {
        let (h, d) = (self.config.kv_heads, self.head_dim.get());
        for (sequence, &n) in counts.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let start = self.pruned[sequence];
            for head in 0..h {
                let stream = sequence * h + head;
                for keys in [true, false] {
                    let s = if keys {
                        self.k_sparsity
                    } else {
                        self.v_sparsity
                    };
                    if s.get() == 0.0 {
                        continue;
                    }
                    let rows = if keys {
                        &self.host_k[stream]
                    } else {
                        &self.host_v[stream]
                    };
                    let block = DenseBlock::new(
                        rows[start * d..(start + n) * d].to_vec(),
                        n,
                        self.head_dim,
                    )?;
                    let masked = self
                        .mask(sequence, head, start, &block, keys, s)?
                        .apply(&block)?;
                    let rows = if keys {
                        &mut self.host_k[stream]
                    } else {
                        &mut self.host_v[stream]
                    };
                    rows[start * d..(start + n) * d].copy_from_slice(masked.data());
                }
            }
            self.pruned[sequence] += n;
        }
        Ok(())
    }

    /// Writes rows `from[s]..to[s]` of every stream from the host copy to the device.
    fn write_back(&mut self, from: &[usize], to: &[usize], device: &B::Device) -> Result<()> {
        let (b, h, d) = (self.config.batch, self.config.kv_heads, self.head_dim.get());
        let n = from.iter().zip(to).map(|(f, t)| t - f).max().unwrap_or(0);
        if n == 0 {
            return Ok(());
        }
        for keys in [true, false] {
            let host = if keys { &self.host_k } else { &self.host_v };
            let mut rows = vec![0.0f32; b * h * n * d];
            for s in 0..b {
                for head in 0..h {
                    let src = &host[s * h + head][from[s] * d..to[s] * d];
                    let dst = ((s * h + head) * n) * d;
                    for (o, &x) in rows[dst..dst + src.len()].iter_mut().zip(src) {
                        *o = x as f32;
                    }
                }
            }
            let tensor = Tensor::<B, 4>::from_data(TensorData::new(rows, [b, h, n, d]), device);
            let counts: Vec<u32> = from.iter().zip(to).map(|(f, t)| (t - f) as u32).collect();
            let zeros = vec![0u32; b];
            let starts: Vec<u32> = from.iter().map(|&f| f as u32).collect();
            let copy = RowCopy {
                sequences: b,
                kv_heads: h,
                head_dim: self.head_dim,
                src_capacity: n,
                dst_capacity: self.dense.capacity(),
                src_start: zeros,
                dst_start: starts,
                counts,
            };
            let (k_buffer, v_buffer) = self.dense.buffers();
            let buffer = if keys { k_buffer } else { v_buffer };
            B::kv_write_rows(
                &[(tensor.into_primitive().tensor(), buffer)],
                self.config.value_type,
                &copy,
            )?;
        }
        Ok(())
    }
}

impl<B: SparseKvBackend> KvCache<B> for MaskedKvCache<B> {
    fn append_ragged(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>, counts: &[usize]) -> Result<()> {
        let device = k.device();
        let rows = k.dims()[2];
        // The dense cache checks every argument and stores the new rows as they are.
        self.dense.append_ragged(k.clone(), v.clone(), counts)?;
        let (b, h, d) = (self.config.batch, self.config.kv_heads, self.head_dim.get());
        let (k, v) = (host_values(k)?, host_values(v)?);
        let before = self.pruned.clone();
        let full = self.config.dense_limit();
        // The sparse cache's policy, replayed on the host: a full window about to take a token
        // gives up its oldest chunk; a prompt keeps exactly the newest `window` tokens.
        let mut offset = vec![0usize; b];
        loop {
            let remaining: Vec<usize> = (0..b).map(|s| counts[s] - offset[s]).collect();
            if remaining.iter().all(|&r| r == 0) {
                break;
            }
            let dense: Vec<usize> = (0..b).map(|s| self.held(s) - self.pruned[s]).collect();
            self.prune_oldest(&room_to_make(&self.config, &dense, &remaining))?;
            for s in 0..b {
                let dense = self.held(s) - self.pruned[s];
                let take = remaining[s].min(full - dense);
                for head in 0..h {
                    let src = ((s * h + head) * rows + offset[s]) * d;
                    let stream = s * h + head;
                    self.host_k[stream].extend_from_slice(&k[src..src + take * d]);
                    self.host_v[stream].extend_from_slice(&v[src..src + take * d]);
                }
                offset[s] += take;
            }
        }
        let dense: Vec<usize> = (0..b).map(|s| self.held(s) - self.pruned[s]).collect();
        self.prune_oldest(&prompt_excess(&self.config, &dense, counts))?;
        let after = self.pruned.clone();
        self.write_back(&before, &after, &device)
    }

    fn attend(&self, q: Tensor<B, 3>) -> Result<Tensor<B, 3>> {
        // The dense cache checks the query first: only valid queries enter the history.
        let out = self.dense.attend(q.clone())?;
        if self.strategy.uses_queries() {
            let host = host_values(q)?;
            let per_sequence = host.len() / self.config.batch;
            let mut recent = self
                .recent
                .lock()
                .map_err(|_| KvCacheError::Invalid("query history lock poisoned".into()))?;
            for (history, step) in recent.iter_mut().zip(host.chunks(per_sequence)) {
                if history.len() == RECENT_QUERIES {
                    history.pop_front();
                }
                history.push_back(step.to_vec());
            }
        }
        Ok(out)
    }

    /// The queries of a prompt chunk attend to the masked rows as they are (pruned ones
    /// masked); they do not enter the query history of the output-aware strategies, which
    /// scores decoding queries.
    fn attend_newest(&self, q: Tensor<B, 4>, counts: &[usize]) -> Result<Tensor<B, 4>> {
        self.dense.attend_newest(q, counts)
    }

    fn prefill_policy(&self) -> PrefillPolicy {
        self.config.prefill
    }

    fn lengths(&self) -> Vec<usize> {
        self.dense.lengths()
    }

    fn compressed_counts(&self) -> Vec<usize> {
        self.pruned.clone()
    }

    /// Masked rows are stored dense: the bytes of a dense cache.
    fn memory(&self) -> KvBytes {
        self.dense.memory()
    }

    fn allocated_bytes(&self) -> usize {
        self.dense.allocated_bytes()
    }
}
