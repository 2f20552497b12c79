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

fn pick(logits: &[f32], sampling: &Sampling, rng: &mut SplitMix) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
                if x > best.1 { (i, x) } else { best }
            })
            .0 as u32
    };
    if sampling.temperature <= 0.0 {
        return argmax();
    }
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

fn read_logits<B: SparseKvBackend>(logits: Tensor<B, 2>) -> Result<Vec<f32>> {
    logits
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| LlamaError::Invalid(format!("reading logits: {e:?}")))
}

/// Generates after `prompt` until `max_tokens` tokens in all (prompt included) or `eos`,
/// calling `on_token` with each new token. The caches must be empty. Returns prompt and new
/// tokens.
pub fn generate<B: SparseKvBackend, C: KvCache<B>>(
    model: &Llama<B>,
    caches: &mut [C],
    prompt: &[u32],
    max_tokens: usize,
    eos: Option<u32>,
    sampling: &Sampling,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    let mut tokens = prompt.to_vec();
    if tokens.len() >= max_tokens {
        return Ok(tokens);
    }
    let mut rng = SplitMix(sampling.seed);
    let mut logits = read_logits(model.prefill(prompt, caches)?)?;
    loop {
        let next = pick(&logits, sampling, &mut rng);
        tokens.push(next);
        on_token(next);
        if Some(next) == eos || tokens.len() >= max_tokens {
            return Ok(tokens);
        }
        logits = read_logits(model.decode(next, tokens.len() - 1, caches)?)?;
    }
}
