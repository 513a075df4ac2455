"""The bottom layer of plip-jax: what every model family and every experiment shares.

- `errors`: one exception hierarchy (`PlipError`); binaries print these as one-line errors.
- `capture`: the static `Capture` spec (what a forward returns) and the `Output` pytree.
- `interventions`: the intervention pytree (attention knockout / steering, residual edits, RWKV state
  edits) and its host-side builders.
- `model`: the `Model` protocol every family implements (`Transformer`, `Rwkv6`).

Nothing here imports from the rest of the package (enforced by import-linter, see pyproject.toml).
"""
