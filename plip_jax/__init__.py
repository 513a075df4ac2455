"""plip-jax: mechanistic interpretability of code language models in JAX/Flax.

The core idea: every experiment is a pure function of arrays,

    out = forward(params, tokens, cfg, interventions=iv, capture=cap)

with the intervention pytree as traced data, so sweeps are `vmap`s.
"""

__version__ = "0.1.0"
