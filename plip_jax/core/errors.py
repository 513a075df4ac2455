"""One exception hierarchy for plip-jax.

Every error the project raises on purpose derives from `PlipError`, and its message names the thing
that is wrong and how to fix it. The binaries print these as `error: <message>` (no traceback unless
`--debug`). Each class also derives from the built-in exception a caller would expect (ValueError,
FileNotFoundError), so `except ValueError` keeps working.
"""

from __future__ import annotations

# The root and the errors of the bottom layer (writing results, non-finite numbers) live in plip_jax.util.
from plip_jax.util.errors import NonFiniteError, OutputError, PlipError  # noqa: F401 (re-exported)


class ConfigError(PlipError, ValueError):
    """A model's config.json is missing a field, malformed, or disagrees with its weights."""


class UnsupportedModelError(ConfigError):
    """The checkpoint's architecture (model_type, RoPE kind, activation) is not one plip-jax implements."""


class ModelNotFoundError(PlipError, FileNotFoundError):
    """--model names no local directory, no cached Hub snapshot, and it could not be downloaded."""


class MissingFileError(PlipError, FileNotFoundError):
    """A file the model or corpus needs (config.json, a weight shard, a corpus) does not exist."""


class MissingTensorError(PlipError, KeyError):
    """A tensor the architecture needs is absent from the checkpoint (incomplete files or another model)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CorruptWeightsError(PlipError, ValueError):
    """A safetensors file is truncated, has a bad header, or a shard is missing."""


class CorpusError(PlipError, ValueError):
    """A corpus file is missing, malformed, or has samples that cannot be used."""


class InterventionError(PlipError, ValueError):
    """An intervention that cannot be applied as asked (future edge, emptied row, out-of-range layer...)."""


class GenerationError(PlipError, ValueError):
    """A generation request that cannot be run as asked (context too long, bad sampling parameters...)."""


class WrongFamilyError(PlipError, ValueError):
    """An experiment that needs one model family (e.g. RWKV-6 state tools) was given another."""


class FlagError(PlipError, ValueError):
    """A command-line flag has a bad value or a bad combination with another flag; the message names it."""
