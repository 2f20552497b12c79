//! Token generation: greedy, or temperature with top-p, seeded; stops at EOS or a length.

use sparsekv_burn::burn::tensor::Tensor;
use sparsekv_burn::{KvCache, SparseKvBackend};

use crate::error::{LlamaError, Result};
use crate::model::Llama;

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 = greedy (argmax, lowest id on ties).
    pub temperature: f32,
    /// Nucleus sampling: smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// A small seeded generator (SplitMix64): reproducible sampling without global state.
struct SplitMix(u64);

impl SplitMix {
    fn uniform(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Samples a token from `logits` at `sampling.temperature` (> 0; greedy decoding takes the
/// arg-max on the device instead) within the `top_p` nucleus.
fn pick(logits: &[f32], sampling: &Sampling, rng: &mut SplitMix) -> u32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f32)> = logits
        .iter()
        .map(|&x| ((x - max) / sampling.temperature).exp())
        .enumerate()
        .collect();
    let total: f32 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (i, p) in probs.iter().enumerate() {
        kept += p.1;
        if kept >= sampling.top_p {
            cut = i + 1;
            break;
        }
    }
    let r = rng.uniform() * kept;
    let mut acc = 0.0;
    for p in &probs[..cut] {
        acc += p.1;
        if r < acc {
            return p.0 as u32;
        }
    }
    probs[cut - 1].0 as u32
}

/// Reads logits `[batch, vocab]` to the host, one row per sequence.
/// What a step hands back to the host: each row's arg-max, computed on the device (greedy
/// decoding reads back only the token ids), or the whole rows of logits to sample from.
enum Scores {
    Ids(Vec<u32>),
    Logits(Vec<Vec<f32>>),
}

impl Scores {
    fn read<B: SparseKvBackend>(logits: Tensor<B, 2>, greedy: bool) -> Result<Self> {
        if !greedy {
            return Ok(Scores::Logits(read_logits(logits)?));
        }
        let ids = logits
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .map_err(|e| LlamaError::Invalid(format!("reading token ids: {e:?}")))?;
        // What was read is garbage if a device thread failed during the step.
        sparsekv_burn::check_device_threads()?;
        Ok(Scores::Ids(ids.into_iter().map(|i| i as u32).collect()))
    }
}

pub(crate) fn read_logits<B: SparseKvBackend>(logits: Tensor<B, 2>) -> Result<Vec<Vec<f32>>> {
    let [_, vocab] = logits.dims();
    let flat = logits
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| LlamaError::Invalid(format!("reading logits: {e:?}")))?;
    sparsekv_burn::check_device_threads()?;
    Ok(flat.chunks(vocab.max(1)).map(<[f32]>::to_vec).collect())
}

/// Generates after `prompt` until `max_tokens` tokens in all (prompt included) or a token
/// of `eos`, calling `on_token` with each new token. The caches must be empty and hold one
/// sequence. Returns prompt and new tokens.
pub fn generate<B: SparseKvBackend, C: KvCache<B>>(
    model: &Llama<B>,
    caches: &mut [C],
    prompt: &[u32],
    max_tokens: usize,
    eos: &[u32],
    sampling: &Sampling,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    let mut out = generate_batch(
        model,
        caches,
        &[prompt],
        max_tokens,
        eos,
        sampling,
        |_, t| on_token(t),
    )?;
    out.pop()
        .ok_or_else(|| LlamaError::Invalid("no sequence generated".into()))
}

/// Generates for a batch of prompts of any lengths at once (one per cache sequence): each
/// sequence runs until `max_tokens` tokens in all (its prompt included) or a token of `eos`;
/// finished sequences stop growing their caches while the others go on. `on_token(s, t)`
/// sees each new token `t` of sequence `s`. Sequence `s` samples with seed
/// `sampling.seed + s`, so sequence 0 of a batch samples as a run of its prompt alone.
/// `max_tokens` is capped at the model's context length. Returns each sequence's prompt and
/// new tokens.
pub fn generate_batch<B: SparseKvBackend, C: KvCache<B>>(
    model: &Llama<B>,
    caches: &mut [C],
    prompts: &[&[u32]],
    max_tokens: usize,
    eos: &[u32],
    sampling: &Sampling,
    mut on_token: impl FnMut(usize, u32),
) -> Result<Vec<Vec<u32>>> {
    let max_tokens = max_tokens.min(model.config().max_seq);
    let mut tokens: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
    let mut active: Vec<bool> = tokens.iter().map(|t| t.len() < max_tokens).collect();
    if !active.iter().any(|&a| a) {
        return Ok(tokens);
    }
    let mut rngs: Vec<SplitMix> = (0..prompts.len())
        .map(|s| SplitMix(sampling.seed.wrapping_add(s as u64)))
        .collect();
    let greedy = sampling.temperature <= 0.0;
    let mut scores = Scores::read(model.prefill_batch(prompts, caches)?, greedy)?;
    loop {
        let mut last = Vec::with_capacity(tokens.len());
        for (s, seq) in tokens.iter_mut().enumerate() {
            if active[s] {
                let next = match &scores {
                    Scores::Ids(ids) => ids[s],
                    Scores::Logits(logits) => pick(&logits[s], sampling, &mut rngs[s]),
                };
                seq.push(next);
                on_token(s, next);
                active[s] = !eos.contains(&next) && seq.len() < max_tokens;
            }
            last.push(*seq.last().unwrap_or(&0));
        }
        if !active.iter().any(|&a| a) {
            return Ok(tokens);
        }
        // Each active sequence's newest token sits at position len - 1, which is what its
        // caches hold.
        scores = Scores::read(model.decode_batch(&last, &active, caches)?, greedy)?;
    }
}
