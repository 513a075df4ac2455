"""Timing, memory and roofline helpers of the benchmark.

* `time_calls`: wall-clock of a callable that blocks until its results are ready (JAX:
  `jax.block_until_ready`; torch: `torch.cuda.synchronize`), first call and the median of N more.
* `device_peaks`: peak matmul throughput and HBM bandwidth per accelerator kind (a small table; None on
  CPU, where no floor is reported).
* memory: JAX's allocator statistics (`memory_stats()`, GPU/TPU only), XLA's static estimate of a compiled
  executable (`memory_analysis()`, every backend), torch's `max_memory_allocated` (CUDA only).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Optional

GIB = float(1 << 30)

# Peak dense throughput (FLOP/s) and HBM bandwidth (bytes/s) per device kind (first matching substring wins).
# float32 uses the non-tensor-core FP32 peak; JAX may run f32 matmuls as TF32 on these GPUs, so f32
# floors are conservative (JAX/floor below 1 is possible). The targets are for bf16. "achievable" is the matmul
# rate the floors use: for H100 the measured 790 TFLOP/s (80% of the 989 TFLOP/s bf16 dense
# datasheet peak); other kinds use the same 80% of their datasheet peak.
_DEVICE_TABLE = (
    # (substring of device_kind, lowercase), name, bf16/f16 dense spec, f32 (non-tensor) spec, HBM bytes/s
    ("h100 pcie", "H100 PCIe", 756e12, 51e12, 2.0e12),
    ("h100 nvl", "H100 NVL", 835e12, 60e12, 3.9e12),
    ("h100", "H100 SXM", 989e12, 67e12, 3.35e12),
    ("gh200", "GH200", 989e12, 67e12, 4.0e12),
    ("h200", "H200", 989e12, 67e12, 4.8e12),
    ("a100", "A100", 312e12, 19.5e12, 2.0e12),
)
H100_MEASURED_BF16_FLOPS = 790e12  # the measured H100 bf16 matmul rate
ACHIEVABLE_FRACTION = H100_MEASURED_BF16_FLOPS / 989e12  # ... over the datasheet peak


@dataclasses.dataclass(frozen=True)
class DevicePeaks:
    """Roofline numbers of one accelerator: FLOP/s (datasheet and the achievable rate the floors use) and
    HBM bytes/s, for the benchmark's dtype."""

    name: str
    spec_flops: float
    achievable_flops: float
    hbm_bytes_per_s: float
    source: str


def device_peaks(device_kind: str, platform: str, dtype: str) -> Optional[DevicePeaks]:
    """Peaks of `device_kind` (e.g. 'NVIDIA H100 80GB HBM3') for `dtype`; None on CPU or unknown kinds."""
    if platform == "cpu":
        return None
    kind = device_kind.lower()
    for key, name, half, f32, hbm in _DEVICE_TABLE:
        if key in kind:
            spec = f32 if dtype == "float32" else half
            measured = name == "H100 SXM" and dtype != "float32"
            achievable = H100_MEASURED_BF16_FLOPS if measured else spec * ACHIEVABLE_FRACTION
            src = ("issue's measured 790 TFLOP/s (datasheet 989 dense bf16)" if measured else
                   f"{ACHIEVABLE_FRACTION:.0%} of the datasheet {spec / 1e12:.0f} TFLOP/s {'fp32' if dtype == 'float32' else 'bf16/fp16 dense'}")
            return DevicePeaks(name, spec, achievable, hbm, src + f"; HBM {hbm / 1e12:.2f} TB/s")
    return None


@dataclasses.dataclass
class Timing:
    """Seconds: the first call (includes compilation for a fresh jit) and `repeats` further calls."""

    first_s: float
    times_s: list

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def first_minus_median_s(self) -> float:
        return max(self.first_s - self.median_s, 0.0)


def time_calls(fn: Callable[[], Any], repeats: int, sync: Callable[[Any], Any]) -> tuple[Timing, Any]:
    """Call `fn` once (timed as first), then `repeats` times; `sync(result)` must block until the result
    is computed (so asynchronous dispatch is inside the timing). Returns (Timing, last result)."""
    t = time.perf_counter()
    out = sync(fn())
    first = time.perf_counter() - t
    times = []
    for _ in range(max(repeats, 1)):
        t = time.perf_counter()
        out = sync(fn())
        times.append(time.perf_counter() - t)
    return Timing(first, times), out


def jax_sync(x: Any) -> Any:
    import jax

    return jax.block_until_ready(x)


def torch_sync(device: str) -> Callable[[Any], Any]:
    def sync(x: Any) -> Any:
        if device == "cuda":
            import torch

            torch.cuda.synchronize()
        return x

    return sync


def jax_memory_stats() -> Optional[dict]:
    """The default device's allocator statistics (bytes_in_use, peak_bytes_in_use, bytes_limit...) or None
    (CPU has none)."""
    import jax

    try:
        return jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without allocator statistics
        return None


def xla_memory_bytes(compiled: Any) -> Optional[dict]:
    """XLA's static memory plan of a compiled executable: arguments (weights + inputs), outputs and temps,
    bytes; `total` = arguments + outputs + temps - aliased. None when the backend does not report it."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    out = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
           "temps": int(m.temp_size_in_bytes), "aliased": int(m.alias_size_in_bytes)}
    out["total"] = out["arguments"] + out["outputs"] + out["temps"] - out["aliased"]
    return out


def torch_reset_peak(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def torch_peak_bytes(device: str) -> Optional[int]:
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    return None


def available_memory_bytes(platform: str) -> Optional[int]:
    """Memory the benchmark may fill on the JAX device: the GPU's total (JAX's bytes_limit, else torch's
    mem_get_info) or, on CPU, the host's MemAvailable. None when unknown."""
    if platform != "cpu":
        stats = jax_memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(stats["bytes_limit"])
        try:
            import torch

            if torch.cuda.is_available():
                return int(torch.cuda.mem_get_info()[1])
        except Exception:  # noqa: BLE001
            pass
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
