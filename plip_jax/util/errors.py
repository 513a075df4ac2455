"""The root of plip-jax's exception hierarchy, and the two errors raised at this bottom layer (writing result
files, refusing non-finite numbers). `plip_jax.core.errors` re-exports them next to every other class."""

from __future__ import annotations


class PlipError(Exception):
    """Base of every error plip-jax raises on purpose (the message says what and how to fix it)."""


class OutputError(PlipError, OSError):
    """A result file cannot be written: --output is a directory, its folder cannot be created or written,
    or the write itself failed (full disk...); the message says where the payload went instead, if anywhere."""


class NonFiniteError(PlipError, ValueError):
    """A NaN or infinite number where a result must be finite (a logit, a KL, a field of a result file);
    the message names the field or the sample."""
