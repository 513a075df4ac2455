"""Flags that check themselves before any model loads.

- `define_float_list` / `define_int_list`: comma-separated numbers parsed (and bounded) by absl, so that
  `--scales=abc`, `--scales=inf` or `--heads=a` fail at start-up naming the flag (exit status 2).
- `refuse_non_finite_floats`: every float flag of a binary must be finite (`--scale=inf` is refused).
- `check_*`: layer, head and vocabulary bounds from the model's config.json (`FlagError` naming the flag
  and the valid range), run before the weights are read.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

from absl import flags

from plip_jax.core.errors import FlagError

FLAGS = flags.FLAGS
flags.disclaim_key_flags()  # the flags below belong to the binary that calls define_*_list


class NumberListParser(flags.ListParser):
    """Comma-separated numbers of one kind (int or float), finite, optionally bounded; the error message names
    the bad item (absl prefixes it with `flag --NAME=VALUE:`)."""

    def __init__(self, kind: type, minimum: Optional[float] = None, maximum: Optional[float] = None):
        super().__init__()
        self.kind, self.minimum, self.maximum = kind, minimum, maximum

    def parse(self, argument: Any) -> list:
        items = argument if isinstance(argument, (list, tuple)) else super().parse(argument)
        out = []
        what = "an integer" if self.kind is int else "a number"
        for item in items:
            text = str(item).strip()
            try:
                value = int(text) if self.kind is int else float(text)
            except ValueError:
                raise ValueError(f"{text!r} is not {what}; give comma-separated {self.flag_type()}, "
                                 f"e.g. {self._example()}") from None
            if not math.isfinite(value):
                raise ValueError(f"{text!r} is not a finite number")
            if self.minimum is not None and value < self.minimum:
                raise ValueError(f"{text} is below the minimum {self.minimum:g}")
            if self.maximum is not None and value > self.maximum:
                raise ValueError(f"{text} is above the maximum {self.maximum:g}")
            out.append(value)
        return out

    def _example(self) -> str:
        return "0,1,2" if self.kind is int else "0.5,1,2"

    def flag_type(self) -> str:
        return "integers" if self.kind is int else "numbers"


def define_float_list(name: str, default: Optional[Sequence], help: str, minimum: Optional[float] = None,
                      maximum: Optional[float] = None) -> None:
    """A comma-separated list of finite floats (FLAGS.name is a list of float)."""
    flags.DEFINE(NumberListParser(float, minimum, maximum), name, default, help, serializer=flags.ListSerializer(","))


def define_int_list(name: str, default: Optional[Sequence], help: str, minimum: Optional[int] = None,
                    maximum: Optional[int] = None) -> None:
    """A comma-separated list of integers (FLAGS.name is a list of int)."""
    flags.DEFINE(NumberListParser(int, minimum, maximum), name, default, help, serializer=flags.ListSerializer(","))


def own_flags() -> Iterable[Any]:
    """The flags defined by plip-jax modules and binaries (not absl's own)."""
    for module, defined in FLAGS.flags_by_module_dict().items():
        if module.split(".")[0] in ("bin", "plip_jax", "benchmarks", "__main__") or module.endswith(".py"):
            yield from defined


def refuse_non_finite_floats() -> None:
    """FlagError for a float flag set to NaN or an infinity (absl's float flags accept 'inf' and 'nan')."""
    for flag in own_flags():
        value = flag.value
        if isinstance(flag.parser, flags.FloatParser) and value is not None and not math.isfinite(value):
            raise FlagError(f"--{flag.name}={value} is not a finite number; give a finite value")


# ---------------------------------------------------------------------------------------------------------
# Bounds from the model's config (before the weights load)


def _flag_value(name: str) -> Any:
    return FLAGS[name].value if name in FLAGS else None


def check_layer(name: str, n_layers: int) -> None:
    """--NAME, if set, must be a layer index 0..n_layers-1."""
    v = _flag_value(name)
    if v is not None and not 0 <= v < n_layers:
        raise FlagError(f"--{name}={v} is out of range: the model has {n_layers} layers (valid 0..{n_layers - 1})")


def check_layer_range(start: str, end: str, n_layers: int, together: bool = False) -> None:
    """--START and --END, each a layer, with START <= END; `together`: one without the other is an error."""
    check_layer(start, n_layers)
    check_layer(end, n_layers)
    a, b = _flag_value(start), _flag_value(end)
    if together and (a is None) != (b is None):
        raise FlagError(f"--{start} and --{end} go together (a window needs both ends)")
    if a is not None and b is not None and a > b:
        raise FlagError(f"--{start}={a} is after --{end}={b}")


def check_heads(name: str, n_heads: int) -> None:
    """--NAME, if set, a list of head indices 0..n_heads-1."""
    heads = _flag_value(name)
    bad = [h for h in heads or [] if not 0 <= int(h) < n_heads]
    if bad:
        raise FlagError(f"--{name}: heads {bad} are out of range: the model has {n_heads} heads "
                        f"(valid 0..{n_heads - 1})")


def check_count(name: str, upper: int, what: str) -> None:
    """--NAME, if set, in 1..upper (e.g. --top_k against the vocabulary, --layers against the depth)."""
    v = _flag_value(name)
    if v is not None and not 1 <= v <= upper:
        raise FlagError(f"--{name}={v} must be in 1..{upper} ({what})")


def check_at_least(name: str, minimum: float, note: str = "") -> None:
    """--NAME (a number or a list of numbers), if set, >= minimum."""
    v = _flag_value(name)
    values = v if isinstance(v, (list, tuple)) else [v]
    bad = [x for x in values if x is not None and float(x) < minimum]
    if bad:
        raise FlagError(f"--{name}={','.join(f'{x:g}' for x in values)}: {bad[0]:g} is below {minimum:g}"
                        + (f" ({note})" if note else ""))


def check_between(name: str, low: float, high: float, note: str = "", low_open: bool = False) -> None:
    """--NAME (a number or a list), if set, in [low, high] ((low, high] with low_open)."""
    v = _flag_value(name)
    values = v if isinstance(v, (list, tuple)) else [v]
    for x in values:
        if x is None:
            continue
        above_low = low < x if low_open else low <= x
        if not (above_low and x <= high):
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise FlagError(f"--{name}={x:g} must be in {interval}" + (f" ({note})" if note else ""))
