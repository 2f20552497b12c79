//! Accuracy under KV pruning: mean negative log-likelihood (perplexity) of a text and top-1
//! agreement with the dense model, by teacher forcing through the decode path.
//!
//! The text is cut into non-overlapping windows that each start with BOS. Every window is fed
//! one token per step through [`Llama::decode_batch`] (all windows of a run form one batch),
//! so the caches prune exactly as they do while generating; step `t` scores token `t + 1` of
//! each window. A prefill of the window would attend densely over the whole prompt and hide
//! the pruning.
//!
//! Per-token magnitude runs on the real compressed cache ([`SparseKvCache`]); every strategy
//! can also run as a mask simulation ([`MaskedKvCache`]), which for per-token magnitude
//! attends to the same values through the dense kernel.

use sparsekv_burn::{
    DenseKvCache, KvCache, KvCacheConfig, MaskedKvCache, PrefillPolicy, PruneStrategy,
    SparseKvBackend, SparseKvCache,
};
use sparsekv_format::ValueType;

use crate::error::{LlamaError, Result};
use crate::generate::read_logits;
use crate::model::Llama;
use crate::text::Tokenizer;

/// Which of the cache's tensors are pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// Keys only.
    Keys,
    /// Values only.
    Values,
    /// Keys and values, at the same sparsity.
    Both,
}

impl Target {
    /// Every target.
    pub const ALL: [Target; 3] = [Target::Keys, Target::Values, Target::Both];

    /// A short name: `K`, `V` or `K+V`.
    pub fn name(self) -> &'static str {
        match self {
            Target::Keys => "K",
            Target::Values => "V",
            Target::Both => "K+V",
        }
    }

    /// Key and value sparsity for overall sparsity `s`.
    pub fn sparsities(self, s: f64) -> (f64, f64) {
        match self {
            Target::Keys => (s, 0.0),
            Target::Values => (0.0, s),
            Target::Both => (s, s),
        }
    }
}

/// How one run's cache is built.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CacheKind {
    /// Dense, nothing pruned: the reference.
    Dense,
    /// sparsekv's compressed cache (per-token magnitude).
    Compressed,
    /// A mask simulation of `strategy`.
    Masked(PruneStrategy),
}

/// One evaluated configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalCase {
    /// The cache.
    pub cache: CacheKind,
    /// What is pruned.
    pub target: Target,
    /// Fraction of each pruned row (or channel group, or channel set) removed.
    pub sparsity: f64,
    /// Recent tokens kept dense.
    pub window: usize,
    /// A prompt prefilled before teacher forcing (`None`: every token goes in one decode step
    /// at a time).
    pub prompt: Option<PromptPrefill>,
}

/// The first `tokens` tokens of every window go in as a prompt, through the model's prefill
/// under `policy`; scoring starts at the token after them. This measures what the prefill
/// policy does to the tokens that follow a prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PromptPrefill {
    /// Prompt tokens per window (at least 1, fewer than the window).
    pub tokens: usize,
    /// How the prompt enters the caches.
    pub policy: PrefillPolicy,
}

impl EvalCase {
    /// The strategy the case measures (`None` for the dense reference).
    pub fn strategy(&self) -> Option<PruneStrategy> {
        match self.cache {
            CacheKind::Dense => None,
            CacheKind::Compressed => Some(PruneStrategy::PerTokenMagnitude),
            CacheKind::Masked(s) => Some(s),
        }
    }
}

/// Per-window, per-step results of one run: `nll[w][t]` is the negative log-likelihood (nats)
/// of token `t + 1` of window `w`, `top1[w][t]` the model's most likely token there.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    /// Negative log-likelihoods, `[windows][steps]`.
    pub nll: Vec<Vec<f64>>,
    /// Arg-max predictions (lowest id on ties), `[windows][steps]`.
    pub top1: Vec<Vec<u32>>,
}

impl Scores {
    /// Tokens scored.
    pub fn tokens(&self) -> usize {
        self.nll.iter().map(Vec::len).sum()
    }

    /// Mean negative log-likelihood per token, in nats.
    pub fn mean_nll(&self) -> f64 {
        let total: f64 = self.nll.iter().flatten().sum();
        total / self.tokens().max(1) as f64
    }

    /// `exp(mean NLL)`.
    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }

    /// Fraction of positions whose prediction equals `reference`'s.
    pub fn agreement(&self, reference: &Scores) -> Result<f64> {
        if reference.top1.len() != self.top1.len()
            || reference
                .top1
                .iter()
                .zip(&self.top1)
                .any(|(a, b)| a.len() != b.len())
        {
            return Err(LlamaError::Invalid(
                "agreement needs scores of the same windows and steps".into(),
            ));
        }
        let same = self
            .top1
            .iter()
            .flatten()
            .zip(reference.top1.iter().flatten())
            .filter(|(a, b)| a == b)
            .count();
        Ok(same as f64 / self.tokens().max(1) as f64)
    }
}

/// The BOS id `tokenizer` puts before a plain prompt.
fn bos_id(tokenizer: &Tokenizer) -> Result<u32> {
    let with = tokenizer.encode("Once", true)?;
    let without = tokenizer.encode("Once", false)?;
    match with.split_first() {
        Some((&bos, rest)) if rest == without.as_slice() => Ok(bos),
        _ => Err(LlamaError::Invalid(
            "the tokenizer adds no BOS token to a prompt; evaluation windows start with BOS".into(),
        )),
    }
}

/// Cuts `text` into windows of `seq_len` tokens, each BOS followed by the next `seq_len - 1`
/// tokens of the text: as many whole windows as score at most `max_tokens` tokens (fewer if the
/// text is shorter). The text is encoded paragraph by paragraph (non-empty lines).
pub fn text_windows(
    tokenizer: &Tokenizer,
    text: &str,
    seq_len: usize,
    max_tokens: usize,
) -> Result<Vec<Vec<u32>>> {
    if seq_len < 2 {
        return Err(LlamaError::Invalid(format!(
            "windows of {seq_len} tokens score nothing; use at least 2"
        )));
    }
    let bos = bos_id(tokenizer)?;
    let per_window = seq_len - 1;
    if max_tokens < per_window {
        return Err(LlamaError::Invalid(format!(
            "at most {max_tokens} scored tokens is less than one window of {per_window}: raise the token budget or shorten the windows"
        )));
    }
    // At most `max_tokens`: whole windows only, rounded down.
    let wanted = max_tokens / per_window * per_window;
    let mut ids = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if ids.len() >= wanted {
            break;
        }
        ids.extend(tokenizer.encode(line, false)?);
    }
    let windows: Vec<Vec<u32>> = ids
        .chunks_exact(per_window)
        .take(wanted / per_window)
        .map(|chunk| std::iter::once(bos).chain(chunk.iter().copied()).collect())
        .collect();
    if windows.is_empty() {
        return Err(LlamaError::Invalid(format!(
            "the text has {} tokens, fewer than one window of {per_window}",
            ids.len()
        )));
    }
    Ok(windows)
}

/// Log-sum-exp of a row minus its `target` entry, in f64, and the row's arg-max.
fn score_row(row: &[f32], target: u32) -> Result<(f64, u32)> {
    let t = target as usize;
    if t >= row.len() {
        return Err(LlamaError::Invalid(format!(
            "token {target} is outside the model's vocabulary of {}",
            row.len()
        )));
    }
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x.is_nan() {
            return Err(LlamaError::Invalid("the model produced a NaN logit".into()));
        }
        if x > row[best] {
            best = i;
        }
    }
    let max = f64::from(row[best]);
    let sum: f64 = row.iter().map(|&x| (f64::from(x) - max).exp()).sum();
    Ok((max + sum.ln() - f64::from(row[t]), best as u32))
}

/// Teacher-forces `windows` (all the same length) through `caches` (empty, one sequence per
/// window), calling `on_step` after every model call (prefill or decode step). With
/// `prompt_tokens > 0` the windows' first tokens go in through the model's prefill (the
/// caches' policy) and scoring starts after them; with 0, at the second token.
pub fn teacher_force<B: SparseKvBackend, C: KvCache<B>>(
    model: &Llama<B>,
    caches: &mut [C],
    windows: &[Vec<u32>],
    prompt_tokens: usize,
    mut on_step: impl FnMut(),
) -> Result<Scores> {
    let len = windows.first().map(Vec::len).unwrap_or(0);
    if len < 2 || windows.iter().any(|w| w.len() != len) {
        return Err(LlamaError::Invalid(
            "teacher forcing needs windows of one length, at least 2 tokens".into(),
        ));
    }
    if len > model.config().max_seq {
        return Err(LlamaError::Invalid(format!(
            "windows of {len} tokens are longer than the model's context of {}",
            model.config().max_seq
        )));
    }
    if prompt_tokens >= len {
        return Err(LlamaError::Invalid(format!(
            "a prompt of {prompt_tokens} tokens leaves nothing to score in windows of {len}"
        )));
    }
    let b = windows.len();
    let mut nll = vec![Vec::with_capacity(len - 1); b];
    let mut top1 = vec![Vec::with_capacity(len - 1); b];
    let active = vec![true; b];
    if prompt_tokens > 0 {
        let prompts: Vec<&[u32]> = windows.iter().map(|w| &w[..prompt_tokens]).collect();
        let logits = model.prefill_batch(&prompts, caches)?;
        for (w, row) in read_logits(logits)?.iter().enumerate() {
            let (n, best) = score_row(row, windows[w][prompt_tokens])?;
            nll[w].push(n);
            top1[w].push(best);
        }
        on_step();
    }
    for t in prompt_tokens..len - 1 {
        let tokens: Vec<u32> = windows.iter().map(|w| w[t]).collect();
        let logits = model.decode_batch(&tokens, &active, caches)?;
        for (w, row) in read_logits(logits)?.iter().enumerate() {
            let (n, best) = score_row(row, windows[w][t + 1])?;
            nll[w].push(n);
            top1[w].push(best);
        }
        on_step();
    }
    Ok(Scores { nll, top1 })
}

/// Runs one case over `windows` on a fresh set of caches: `chunk` tokens are pruned at once
/// when the window overflows (the sparse cache's policy, replayed by the mask simulation).
pub fn evaluate<B: SparseKvBackend>(
    model: &Llama<B>,
    windows: &[Vec<u32>],
    case: &EvalCase,
    chunk: usize,
    value_type: ValueType,
    device: &B::Device,
    on_step: impl FnMut(),
) -> Result<Scores> {
    let c = model.config();
    let len = windows.first().map(Vec::len).unwrap_or(0);
    let (ks, vs) = case.target.sparsities(case.sparsity);
    let config = KvCacheConfig::new(windows.len().max(1), c.n_kv_heads, c.head_dim(), len.max(1))
        .with_window(case.window)
        .with_chunk(chunk)
        .with_sparsity(ks, vs)
        .with_value_type(value_type)
        .with_prefill(case.prompt.map_or(PrefillPolicy::Exact, |p| p.policy));
    let prompt_tokens = case.prompt.map_or(0, |p| p.tokens);
    let layers = c.n_layers;
    match case.cache {
        CacheKind::Dense => {
            let mut caches = (0..layers)
                .map(|_| DenseKvCache::<B>::new(&config, device))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            teacher_force(model, &mut caches, windows, prompt_tokens, on_step)
        }
        CacheKind::Compressed => {
            let mut caches = (0..layers)
                .map(|_| SparseKvCache::<B>::new(&config, device))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            teacher_force(model, &mut caches, windows, prompt_tokens, on_step)
        }
        CacheKind::Masked(strategy) => {
            let mut caches = (0..layers)
                .map(|_| MaskedKvCache::<B>::new(&config, strategy, device))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            teacher_force(model, &mut caches, windows, prompt_tokens, on_step)
        }
    }
}

/// The sweep of the accuracy study: for each window, sparsity 0 once per strategy, then every
/// strategy x target x non-zero sparsity (ThinK on keys only). Per-token magnitude runs on the
/// compressed cache; the others are mask simulations.
pub fn sweep(sparsities: &[f64], windows: &[usize], strategies: &[PruneStrategy]) -> Vec<EvalCase> {
    let cache = |s: PruneStrategy| {
        if s == PruneStrategy::PerTokenMagnitude {
            CacheKind::Compressed
        } else {
            CacheKind::Masked(s)
        }
    };
    let mut cases = Vec::new();
    for &window in windows {
        for &strategy in strategies {
            for target in Target::ALL {
                if !strategy.prunes_values() && target != Target::Keys {
                    continue;
                }
                for &sparsity in sparsities {
                    // Sparsity 0 prunes nothing: one run per strategy says so.
                    if sparsity == 0.0 && target != Target::Keys {
                        continue;
                    }
                    cases.push(EvalCase {
                        prompt: None,
                        cache: cache(strategy),
                        target,
                        sparsity,
                        window,
                    });
                }
            }
        }
    }
    cases
}
