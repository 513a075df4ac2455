"""Tiny random checkpoints of each transformer family, built by `transformers` and saved with
`save_pretrained` inside the tests (no download)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FAMILIES = ("qwen2", "llama", "gemma", "phi3", "starcoder2")


def tiny_hf_config(family: str, **overrides):
    import transformers as tf

    common = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False)
    if family == "qwen2":
        cfg = tf.Qwen2Config(**common, rope_theta=10000.0, rms_norm_eps=1e-6)
    elif family == "llama":
        cfg = tf.LlamaConfig(**common, rope_theta=500000.0, rms_norm_eps=1e-5)
    elif family == "gemma":
        c = dict(common, tie_word_embeddings=True, head_dim=24)
        cfg = tf.GemmaConfig(**c, rope_theta=10000.0, hidden_activation="gelu_pytorch_tanh")
    elif family == "phi3":
        c = dict(common, num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        cfg = tf.Phi3Config(**c, rope_theta=10000.0, sliding_window=None)
    elif family == "starcoder2":
        c = dict(common, tie_word_embeddings=True)
        cfg = tf.Starcoder2Config(**c, rope_theta=10000.0, use_bias=True, sliding_window=None,
                                  hidden_act="gelu_pytorch_tanh")
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build_hf_model(family: str, seed: int = 0, **overrides):
    """A randomly initialised HF model in fp32 eval mode with eager attention. Weights are perturbed
    (norm scales, biases) so that no parameter sits at a trivial init value."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_hf_config(family, **overrides)
    cfg._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return model


def save_hf_model(model, path: Path, dtype=None, max_shard_size=None) -> Path:
    import torch

    path = Path(path)
    if dtype is not None:
        model = model.to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kw)
    if dtype is not None:
        model.to(torch.float32)
    return path


def hf_outputs(model, tokens: np.ndarray):
    """(logits [B, T, V], attentions [L][B, H, T, T]) from HF eager fp32."""
    import torch

    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens)), output_attentions=True)
    return out.logits.float().numpy(), [a.float().numpy() for a in out.attentions]


def hf_hidden_states(model, tokens: np.ndarray, lens_layers=()):
    """(hidden_states [L+1][B, T, D], {l: lens logits [B, T, V]}) from HF eager fp32 with output_hidden_states.

    hidden_states[0] is the embedding output, hidden_states[l + 1] the residual after block l for l < L - 1, and
    the last entry is after the final norm. The lens of block l is HF's own final norm + lm_head applied to
    hidden_states[l + 1]."""
    import torch

    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens)), output_hidden_states=True)
        hs = out.hidden_states
        lens = {l: model.lm_head(model.model.norm(hs[l + 1])).float().numpy() for l in lens_layers}
    return [h.float().numpy() for h in hs], lens
