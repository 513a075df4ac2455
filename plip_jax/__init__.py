"""plip-jax: mechanistic interpretability of code language models in JAX/Flax.

The core idea: every model family is a Flax pytree module with one interface (`plip_jax.core.model.Model`),

    out = model(tokens, interventions=iv, capture=cap)       # -> plip_jax.core.capture.Output

with the intervention pytree as traced data, so sweeps are `vmap`s and callers `jit` the model itself.
"spec §N" in docstrings cites docs/plip_rs_spec.md (PLIP-rs's reference behaviour); the methods behind every
reported number are in docs/METHODS.md.
"""

__version__ = "0.1.0"
