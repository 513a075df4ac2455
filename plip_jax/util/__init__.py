"""Small helpers with no dependency on the rest of plip-jax (progress lines, token text)."""
