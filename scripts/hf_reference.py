#!/usr/bin/env python3
"""Independent reference for a Hugging Face Llama directory: greedy generation in float64
NumPy, written from the Llama architecture as Hugging Face `transformers` defines it
(rotate-half RoPE, GQA, SwiGLU, RMSNorm), tokenised with the Python `tokenizers` package.

It produces the golden output that tests/model.rs checks the Rust model against, from code
that shares nothing with the Rust implementation. With --transformers it also runs
`transformers`' own LlamaForCausalLM (where torch and transformers are installed, e.g. the
GPU machine) and checks that both agree.

    pip install numpy tokenizers safetensors
    python3 scripts/hf_reference.py ../shared/models/tinystories-656K "Once upon a time" 64
"""
import json
import sys

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def forward(cfg, w, ids):
    """Logits of the last position for token ids `ids` (full causal recomputation)."""
    dim, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = dim // nh
    eps = cfg.get("rms_norm_eps", 1e-6)
    theta = cfg.get("rope_theta", 10000.0)
    n = len(ids)
    emb = w.get("model.embed_tokens.weight", w.get("lm_head.weight"))
    x = emb[ids]
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.outer(np.arange(n, dtype=np.float64), inv)
    cos = np.cos(np.concatenate([ang, ang], axis=-1))[None]
    sin = np.sin(np.concatenate([ang, ang], axis=-1))[None]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(n, nh, hd).transpose(1, 0, 2)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(n, nkv, hd).transpose(1, 0, 2)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(n, nkv, hd).transpose(1, 0, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = np.repeat(k, nh // nkv, axis=0)
        v = np.repeat(v, nh // nkv, axis=0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        x = x + a.transpose(1, 0, 2).reshape(n, dim) @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        g = h @ w[p + "mlp.gate_proj.weight"].T
        u = h @ w[p + "mlp.up_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", emb)
    return x[-1] @ head.T


def main():
    model_dir, prompt, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = json.load(open(f"{model_dir}/config.json"))
    w = {k: v.astype(np.float64) for k, v in load_file(f"{model_dir}/model.safetensors").items()}
    tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    ids = tok.encode(prompt).ids
    print("prompt ids:", ids)
    gaps = []
    while len(ids) < steps:
        logits = forward(cfg, w, ids)
        top2 = np.sort(logits)[-2:]
        gaps.append(top2[1] - top2[0])
        ids.append(int(np.argmax(logits)))
        if ids[-1] == cfg.get("eos_token_id"):
            break
    print("ids:", ids)
    print("smallest top-1/top-2 logit gap:", min(gaps))
    print("text:", json.dumps(tok.decode(ids)))
    if "--transformers" in sys.argv:
        import torch
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float64)
        out = m.generate(
            torch.tensor([tok.encode(prompt).ids]),
            max_length=steps,
            do_sample=False,
        )[0].tolist()
        print("transformers ids:", out)
        print("transformers agrees:", out == ids[: len(out)])


if __name__ == "__main__":
    main()
