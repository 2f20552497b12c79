//! Fetching a model directory from the Hugging Face Hub (the `hub` feature), through the
//! `hf-hub` crate and its cache (`HF_HOME`, by default `~/.cache/huggingface`).
//!
//! Files already in the cache are used without touching the network, so a model downloaded
//! once works offline. Otherwise one request is tried, without retries: on a machine with no
//! route to the Hub the call fails at once with an error that says to pass a local directory.

use std::path::{Path, PathBuf};

use crate::error::{LlamaError, Result};
use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo};

/// Where and how to look for a Hub model.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// The cache folder; `None` is hf-hub's default (`HF_HOME` or `~/.cache/huggingface`).
    pub cache_dir: Option<PathBuf>,
    /// Use the cache only, never the network (also set by `HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Show download progress bars.
    pub progress: bool,
}

const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
const OPTIONAL: [&str; 3] = [
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
];

fn failed(repo: &str, file: &str, why: impl std::fmt::Display) -> LlamaError {
    LlamaError::Download(format!(
        "cannot fetch {file} of {repo} from the Hugging Face Hub ({why}). Without network \
         access, download the model elsewhere and pass its directory with --model DIR"
    ))
}

enum Source {
    Cache(hf_hub::CacheRepo),
    Online(ApiRepo),
}

impl Source {
    fn get(&self, repo: &str, file: &str) -> Result<PathBuf> {
        match self {
            Source::Cache(c) => c
                .get(file)
                .ok_or_else(|| failed(repo, file, "not in the local cache and offline mode is on")),
            Source::Online(api) => api.get(file).map_err(|e| failed(repo, file, e)),
        }
    }
}

/// Fetches (or finds in the cache) the files of Hub model `repo_id` that
/// [`crate::Pretrained::load_dir`] reads, and returns the local directory holding them.
pub fn fetch_model(repo_id: &str, options: &HubOptions) -> Result<PathBuf> {
    let cache = match &options.cache_dir {
        Some(dir) => Cache::new(dir.clone()),
        None => Cache::from_env(),
    };
    let repo = Repo::model(repo_id.to_string());
    let cached = cache.repo(repo.clone());
    let all_cached = REQUIRED.iter().all(|f| cached.get(f).is_some())
        && (cached.get("model.safetensors").is_some()
            || cached.get("model.safetensors.index.json").is_some());
    let offline =
        options.offline || std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0");
    let source = if all_cached || offline {
        Source::Cache(cached)
    } else {
        let api = ApiBuilder::from_cache(cache)
            .with_progress(options.progress)
            .with_retries(0)
            .build()
            .map_err(|e| failed(repo_id, "anything", e))?;
        Source::Online(api.repo(repo))
    };
    let mut dir = None;
    for file in REQUIRED {
        let path = source.get(repo_id, file)?;
        dir.get_or_insert_with(|| path.parent().map(Path::to_path_buf).unwrap_or_default());
    }
    for file in OPTIONAL {
        // Absent from many repositories; the loader does without them.
        let _ = source.get(repo_id, file);
    }
    if source.get(repo_id, "model.safetensors").is_err() {
        let index = source.get(repo_id, "model.safetensors.index.json")?;
        let shards = crate::hf::shard_names(&index)?;
        for shard in shards {
            source.get(repo_id, &shard)?;
        }
    }
    dir.ok_or_else(|| failed(repo_id, "config.json", "no path"))
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn offline_without_cache_fails_at_once_naming_the_fix() {
        let empty = std::env::temp_dir().join(format!("sparsekv-hub-{}", std::process::id()));
        let options = HubOptions {
            cache_dir: Some(empty),
            offline: true,
            progress: false,
        };
        let start = std::time::Instant::now();
        let err = fetch_model("TinyLlama/TinyLlama-1.1B-Chat-v1.0", &options)
            .expect_err("nothing is cached");
        assert!(start.elapsed().as_secs() < 5);
        let msg = err.to_string();
        assert!(
            msg.contains("--model DIR") && msg.contains("config.json"),
            "{msg}"
        );
    }
}
