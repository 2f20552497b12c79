//! Hugging Face model directories: `config.json` plus `model.safetensors`, or shards
//! `model-*.safetensors` listed by `model.safetensors.index.json`. Files are memory-mapped and
//! each tensor is converted to f32 on its own, so a model is never held twice in host memory.
//! Weights may be f32, f16 or bf16. Hugging Face Llama checkpoints pair RoPE channels in the
//! rotate-half form, so the loaded config says [`RopeStyle::RotateHalf`].

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::checkpoint::{LayerWeights, LlamaWeights};
use crate::config::{Llama3RopeScaling, LlamaConfig, RopeStyle};
use crate::error::{LlamaError, Result, read_file};

/// The fields of a Hugging Face `config.json` that a Llama decoder needs.
#[derive(Debug, Clone, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "default_rms_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    rope_theta: f64,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    tie_word_embeddings: bool,
    head_dim: Option<usize>,
    hidden_act: Option<String>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
}

fn default_rms_eps() -> f64 {
    1e-6
}

fn default_rope_theta() -> f64 {
    10000.0
}

fn malformed(path: &Path, problem: impl Into<String>) -> LlamaError {
    LlamaError::Malformed {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

/// Reads and checks `config.json`, turning it into a [`LlamaConfig`].
pub fn load_hf_config(path: impl AsRef<Path>) -> Result<(LlamaConfig, bool)> {
    let path = path.as_ref();
    let bytes = read_file(path)?;
    let hf: HfConfig = serde_json::from_slice(&bytes)
        .map_err(|e| malformed(path, format!("not a Llama config.json: {e}")))?;
    if let Some(t) = &hf.model_type
        && t != "llama"
    {
        return Err(malformed(
            path,
            format!("model_type {t:?} is not supported (only \"llama\")"),
        ));
    }
    if let Some(act) = &hf.hidden_act
        && act != "silu"
    {
        return Err(malformed(path, format!("hidden_act {act:?} is not silu")));
    }
    if hf.attention_bias || hf.mlp_bias {
        return Err(malformed(path, "attention or MLP biases are not supported"));
    }
    let check = |v: usize, name: &str, max: usize| {
        if v == 0 || v > max {
            Err(malformed(
                path,
                format!("{name} = {v} is outside 1..={max}"),
            ))
        } else {
            Ok(v)
        }
    };
    let dim = check(hf.hidden_size, "hidden_size", 1 << 16)?;
    let hidden = check(hf.intermediate_size, "intermediate_size", 1 << 18)?;
    let layers = check(hf.num_hidden_layers, "num_hidden_layers", 1024)?;
    let heads = check(hf.num_attention_heads, "num_attention_heads", 1024)?;
    let kv_heads = check(
        hf.num_key_value_heads.unwrap_or(heads),
        "num_key_value_heads",
        1024,
    )?;
    let vocab = check(hf.vocab_size, "vocab_size", 1 << 22)?;
    let max_seq = check(
        hf.max_position_embeddings,
        "max_position_embeddings",
        1 << 22,
    )?;
    if dim % heads != 0 || heads % kv_heads != 0 {
        return Err(malformed(
            path,
            format!("hidden_size {dim}, {heads} heads and {kv_heads} KV heads do not divide"),
        ));
    }
    if let Some(hd) = hf.head_dim
        && hd != dim / heads
    {
        return Err(malformed(
            path,
            format!(
                "head_dim {hd} differs from hidden_size / num_attention_heads = {}; not supported",
                dim / heads
            ),
        ));
    }
    if !(hf.rms_norm_eps > 0.0 && hf.rope_theta > 0.0) {
        return Err(malformed(
            path,
            "rms_norm_eps and rope_theta must be positive",
        ));
    }
    let rope_scaling = match &hf.rope_scaling {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(parse_rope_scaling(path, v)?),
    };
    let config = LlamaConfig {
        dim,
        hidden_dim: hidden,
        n_layers: layers,
        n_heads: heads,
        n_kv_heads: kv_heads,
        vocab_size: vocab,
        max_seq,
        rope_theta: hf.rope_theta as f32,
        rope_style: RopeStyle::RotateHalf,
        rope_scaling,
        rms_eps: hf.rms_norm_eps as f32,
    };
    Ok((config, hf.tie_word_embeddings))
}

fn parse_rope_scaling(path: &Path, v: &serde_json::Value) -> Result<Llama3RopeScaling> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("");
    if kind != "llama3" {
        return Err(malformed(
            path,
            format!("rope_scaling type {kind:?} is not supported (only \"llama3\")"),
        ));
    }
    let field = |name: &str| {
        v.get(name)
            .and_then(|x| x.as_f64())
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| malformed(path, format!("rope_scaling.{name} missing or not positive")))
    };
    let scaling = Llama3RopeScaling {
        factor: field("factor")?,
        low_freq_factor: field("low_freq_factor")?,
        high_freq_factor: field("high_freq_factor")?,
        original_max_position: field("original_max_position_embeddings")?,
    };
    if scaling.high_freq_factor <= scaling.low_freq_factor {
        return Err(malformed(
            path,
            "rope_scaling.high_freq_factor must exceed low_freq_factor",
        ));
    }
    Ok(scaling)
}

/// The distinct shard file names that a `model.safetensors.index.json` lists, checked to be
/// plain file names (no path that could leave the model directory).
pub(crate) fn shard_names(index: &Path) -> Result<Vec<String>> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let parsed: Index = serde_json::from_slice(&read_file(index)?)
        .map_err(|e| malformed(index, format!("not a safetensors index: {e}")))?;
    let mut files: Vec<String> = parsed.weight_map.into_values().collect();
    files.sort();
    files.dedup();
    if let Some(bad) = files
        .iter()
        .find(|f| f.contains('/') || f.contains('\\') || f.starts_with('.'))
    {
        return Err(malformed(
            index,
            format!("shard name {bad:?} is not a plain file name"),
        ));
    }
    Ok(files)
}

/// Memory-maps the safetensors files of the model in `dir`.
fn map_shards(dir: &Path) -> Result<Vec<(PathBuf, Mmap)>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let names: Vec<String> = if single.exists() {
        vec!["model.safetensors".into()]
    } else if index.exists() {
        shard_names(&index)?
    } else {
        return Err(LlamaError::Invalid(format!(
            "{} has neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        )));
    };
    let mut maps = Vec::with_capacity(names.len());
    for name in names {
        let path = dir.join(name);
        let io = |source| LlamaError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: the map is read-only and outlives every view taken from it; as with every
        // memory-mapped loader, the file must not be truncated while the model loads.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        maps.push((path, map));
    }
    Ok(maps)
}

/// The parsed safetensors files of a model, and which file holds each tensor.
struct Shards<'a> {
    files: Vec<(&'a Path, SafeTensors<'a>)>,
    /// Tensor name -> index into `files`.
    owner: HashMap<String, usize>,
}

impl<'a> Shards<'a> {
    fn parse(maps: &'a [(PathBuf, Mmap)]) -> Result<Self> {
        let mut files = Vec::with_capacity(maps.len());
        let mut owner = HashMap::new();
        for (i, (path, map)) in maps.iter().enumerate() {
            let st = SafeTensors::deserialize(map).map_err(|e| malformed(path, e.to_string()))?;
            for name in st.names() {
                owner.insert(name.to_string(), i);
            }
            files.push((path.as_path(), st));
        }
        Ok(Shards { files, owner })
    }

    fn contains(&self, name: &str) -> bool {
        self.owner.contains_key(name)
    }

    /// Tensor `name` as f32, checked to have `shape`.
    fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let Some(&i) = self.owner.get(name) else {
            return Err(LlamaError::Invalid(format!(
                "tensor {name} is missing from the model's safetensors files"
            )));
        };
        let (path, st) = &self.files[i];
        let view = st
            .tensor(name)
            .map_err(|e| malformed(path, e.to_string()))?;
        if view.shape() != shape {
            return Err(malformed(
                path,
                format!(
                    "tensor {name} has shape {:?}, the config needs {shape:?}",
                    view.shape()
                ),
            ));
        }
        // safetensors has checked that the bytes match the shape and dtype.
        let bytes = view.data();
        Ok(match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(malformed(
                    path,
                    format!("tensor {name} has dtype {other:?}; only F32, F16 and BF16 load"),
                ));
            }
        })
    }
}

/// Loads a Hugging Face Llama model directory (`config.json` and safetensors weights).
pub fn load_hf(dir: impl AsRef<Path>) -> Result<LlamaWeights> {
    let dir = dir.as_ref();
    let (config, tied) = load_hf_config(dir.join("config.json"))?;
    let maps = map_shards(dir)?;
    let shards = Shards::parse(&maps)?;
    let c = &config;
    let (dim, hidden, hd) = (c.dim, c.hidden_dim, c.head_dim());
    let (q_dim, kv_dim) = (c.n_heads * hd, c.n_kv_heads * hd);
    let mut layers = Vec::with_capacity(c.n_layers);
    for l in 0..c.n_layers {
        let p = format!("model.layers.{l}");
        layers.push(LayerWeights {
            attn_norm: shards.f32(&format!("{p}.input_layernorm.weight"), &[dim])?,
            wq: shards.f32(&format!("{p}.self_attn.q_proj.weight"), &[q_dim, dim])?,
            wk: shards.f32(&format!("{p}.self_attn.k_proj.weight"), &[kv_dim, dim])?,
            wv: shards.f32(&format!("{p}.self_attn.v_proj.weight"), &[kv_dim, dim])?,
            wo: shards.f32(&format!("{p}.self_attn.o_proj.weight"), &[dim, q_dim])?,
            ffn_norm: shards.f32(&format!("{p}.post_attention_layernorm.weight"), &[dim])?,
            w1: shards.f32(&format!("{p}.mlp.gate_proj.weight"), &[hidden, dim])?,
            w2: shards.f32(&format!("{p}.mlp.down_proj.weight"), &[dim, hidden])?,
            w3: shards.f32(&format!("{p}.mlp.up_proj.weight"), &[hidden, dim])?,
        });
    }
    let vocab_shape = [c.vocab_size, dim];
    let (embed, head) = ("model.embed_tokens.weight", "lm_head.weight");
    let (embedding, classifier) = if tied {
        // Tied checkpoints store the shared table under either name (some only as lm_head).
        let name = if shards.contains(embed) { embed } else { head };
        (shards.f32(name, &vocab_shape)?, None)
    } else {
        (
            shards.f32(embed, &vocab_shape)?,
            Some(shards.f32(head, &vocab_shape)?),
        )
    };
    Ok(LlamaWeights {
        embedding,
        layers,
        final_norm: shards.f32("model.norm.weight", &[dim])?,
        classifier,
        config,
    })
}
