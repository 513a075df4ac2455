"""Helpers that build tiny random RWKV-6 checkpoints (BlinkDL .pth layout) for tests."""

from __future__ import annotations

import os

import numpy as np

TINY_RWKV_LAYERS = 3  # layers of conftest's shared tiny checkpoint (`tiny_rwkv_dir`, `tiny_rwkv_model`)


def random_blinkdl_state_dict(*, vocab: int = 512, hidden: int = 64, layers: int = 2, head_size: int = 16,
                              mix_lora: int = 8, decay_lora: int = 16, intermediate: int | None = None,
                              seed: int = 0) -> dict:
    """Random RWKV-6 weights with BlinkDL names/shapes (torch f32 tensors) and non-trivial activations.

    time_decay ~ U(-5, 1) (decays from ~0.993 to ~0.07), time_faaaa ~ N(0, 0.5), mixes ~ U(0, 1).
    """
    import torch

    rng = np.random.default_rng(seed)
    D, A = hidden, hidden
    I = intermediate or int(hidden * 3.5) // 32 * 32
    H = A // head_size

    def t(a):
        return torch.tensor(np.asarray(a, np.float32))

    def lin(o, i):
        return t(rng.normal(0, 1 / np.sqrt(i), (o, i)))

    sd = {"emb.weight": t(rng.normal(0, 1.0, (vocab, D))),
          "blocks.0.ln0.weight": t(1 + 0.1 * rng.normal(size=D)),
          "blocks.0.ln0.bias": t(0.1 * rng.normal(size=D))}
    for l in range(layers):
        b = f"blocks.{l}."
        for n in ("ln1", "ln2"):
            sd[b + n + ".weight"] = t(1 + 0.1 * rng.normal(size=D))
            sd[b + n + ".bias"] = t(0.1 * rng.normal(size=D))
        for c in "xwkvrg":
            sd[b + f"att.time_maa_{c}"] = t(rng.uniform(0, 1, (1, 1, D)))
        sd[b + "att.time_maa_w1"] = t(rng.normal(0, 0.3, (D, 5 * mix_lora)))
        sd[b + "att.time_maa_w2"] = t(rng.normal(0, 0.3, (5, mix_lora, D)))
        sd[b + "att.time_decay"] = t(rng.uniform(-5, 1, (1, 1, A)))
        sd[b + "att.time_decay_w1"] = t(rng.normal(0, 0.3, (D, decay_lora)))
        sd[b + "att.time_decay_w2"] = t(rng.normal(0, 0.3, (decay_lora, A)))
        sd[b + "att.time_faaaa"] = t(rng.normal(0, 0.5, (H, head_size)))
        for n in ("receptance", "key", "value", "gate"):
            sd[b + f"att.{n}.weight"] = lin(A, D)
        sd[b + "att.output.weight"] = lin(D, A)
        sd[b + "att.ln_x.weight"] = t(1 + 0.1 * rng.normal(size=A))
        sd[b + "att.ln_x.bias"] = t(0.1 * rng.normal(size=A))
        sd[b + "ffn.time_maa_k"] = t(rng.uniform(0, 1, (1, 1, D)))
        sd[b + "ffn.time_maa_r"] = t(rng.uniform(0, 1, (1, 1, D)))
        sd[b + "ffn.key.weight"] = lin(I, D)
        sd[b + "ffn.receptance.weight"] = lin(D, D)
        sd[b + "ffn.value.weight"] = lin(D, I)
    sd["ln_out.weight"] = t(1 + 0.1 * rng.normal(size=D))
    sd["ln_out.bias"] = t(0.1 * rng.normal(size=D))
    sd["head.weight"] = t(rng.normal(0, 2 / np.sqrt(D), (vocab, D)))
    return sd


def write_blinkdl_pth(path: str, **kwargs) -> str:
    """Saves `random_blinkdl_state_dict(**kwargs)` with torch.save; returns the path."""
    import torch

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(random_blinkdl_state_dict(**kwargs), path)
    return path


def write_hf_checkpoint(out_dir: str, **kwargs) -> str:
    """Random BlinkDL weights converted to an HF-format directory (model.safetensors + config.json)."""
    from plip_jax.models import rwkv6_checkpoint

    pth = write_blinkdl_pth(os.path.join(out_dir, "blinkdl", "model.pth"), **kwargs)
    rwkv6_checkpoint.convert_to_hf_safetensors(pth, out_dir)
    return out_dir
