"""Floors, targets and tables of benchmark records.

A record (one shape x workload, see `workloads`) gains here: `arith_floor_s` (FLOPs / achievable matmul
rate), `memory_floor_s` (minimum HBM bytes / bandwidth), `floor_s` (the larger), `speedup`
(torch median / JAX median) and `target` {"text", "met", "applies"}. The targets are issue 15's (performance
round 2), defined for bf16 on an H100-class GPU (H100, H200) at a 7B shape (`applies`); elsewhere they are
evaluated the same way and flagged indicative.
"""

from __future__ import annotations

from typing import Optional

from benchmarks.harness.harness import GIB, DevicePeaks

LAYER_SCAN_FLOOR_RATIO = 1.2
KNOCKOUT_SPEEDUP = 3.0
STEERING_SPEEDUP = 4.0
GENERATION_SPEEDUP = 5.0
GENERATION_FLOOR_FRACTION = 0.75  # tokens/s at least this share of the floor's (the HBM floor at 7B)
COMPILE_LIMIT_S = 30.0  # each 7B workload's compile time
LAYER_SCAN_MEMORY_BYTES = 16 * (1 << 30)  # "fits in 16 GB": a 16 GB card has 16 GiB


def add_floors(rec: dict, peaks: Optional[DevicePeaks]) -> None:
    """Fill the floors (seconds; None when there is no table entry for the device, e.g. CPU)."""
    if peaks is None:
        rec["arith_floor_s"] = rec["memory_floor_s"] = rec["floor_s"] = None
        return
    rec["arith_floor_s"] = rec["flops"] / peaks.achievable_flops
    rec["memory_floor_s"] = rec["bytes"] / peaks.hbm_bytes_per_s
    rec["floor_s"] = max(rec["arith_floor_s"], rec["memory_floor_s"])


def _speedup(rec: dict) -> Optional[float]:
    if rec.get("torch") and rec.get("jax"):
        return rec["torch"]["median_s"] / rec["jax"]["median_s"]
    return None


def jax_peak_bytes(rec: dict) -> Optional[int]:
    """Measured allocator peak when the backend has one (cumulative over the process), else XLA's plan."""
    j = rec.get("jax") or {}
    if j.get("peak_bytes_in_use"):
        return int(j["peak_bytes_in_use"])
    mem = j.get("xla_memory_bytes")
    return int(mem["total"]) if mem else None


def _at_least(value: float, target: float) -> str:
    """'met', or 'MISSED, needs Nx more' for a value that must reach at least `target`."""
    return "met" if value >= target else f"MISSED, needs {target / value:.2f}x more"


def evaluate_target(rec: dict, applies: bool) -> dict:
    """The issue's target for this workload: text saying met / missed and by how much."""
    w, sp = rec["workload"], _speedup(rec)
    met: Optional[bool] = None
    if w == "layer_scan":
        parts = []
        if rec.get("arith_floor_s"):
            ratio = rec["jax"]["median_s"] / rec["arith_floor_s"]
            ok = ratio <= LAYER_SCAN_FLOOR_RATIO
            parts.append(f"{ratio:.2f}x arith floor (target <= {LAYER_SCAN_FLOOR_RATIO}x): " +
                         ("met" if ok else f"MISSED by {ratio / LAYER_SCAN_FLOOR_RATIO:.2f}x"))
            met = ok
        else:
            parts.append("floor n/a on this device")
        plan = (rec["jax"].get("xla_memory_bytes") or {}).get("total")
        peak = plan if plan is not None else rec["jax"].get("peak_bytes_in_use")
        if peak is not None:
            ok = peak <= LAYER_SCAN_MEMORY_BYTES
            src = "XLA plan (weights + inputs + temps + outputs)" if plan is not None else "measured peak"
            parts.append(f"{src} {peak / GIB:.2f} GiB (target <= 16 GiB): " +
                         ("met" if ok else f"MISSED by {(peak - LAYER_SCAN_MEMORY_BYTES) / GIB:.2f} GiB"))
            met = ok if met is None else (met and ok)
        text = "; ".join(parts)
    elif w == "knockout_scan":
        if sp is None:
            text = "no torch run"
        else:
            met = sp >= KNOCKOUT_SPEEDUP
            text = f"{sp:.2f}x vs torch hook-per-layer (target >= {KNOCKOUT_SPEEDUP:.0f}x): " + _at_least(
                sp, KNOCKOUT_SPEEDUP)
            if rec["jax"].get("calls", 1) > 1:
                text += f" (JAX: {rec['jax']['calls']} calls of {rec['jax']['samples_per_call']} samples)"
    elif w == "steering_sweep":
        met = bool(rec.get("one_compiled_call"))
        text = f"one compiled call for {len(rec.get('doses', []))} doses: {'met' if met else 'MISSED'}"
        if sp is not None:
            text += f"; {sp:.2f}x vs torch (target >= {STEERING_SPEEDUP:.0f}x): " + _at_least(sp, STEERING_SPEEDUP)
            met = met and sp >= STEERING_SPEEDUP
    elif w == "generation":
        jt = rec["jax"].get("tokens_per_s")
        if sp is None:
            text = f"JAX {jt:.0f} tok/s; no torch run"
        else:
            tt = rec["torch"]["tokens_per_s"]
            met = sp >= GENERATION_SPEEDUP
            text = f"{jt:.0f} vs {tt:.0f} tok/s = {sp:.2f}x (target >= {GENERATION_SPEEDUP:.0f}x): " + _at_least(
                sp, GENERATION_SPEEDUP)
        if rec.get("floor_s"):
            share = rec["floor_s"] / rec["jax"]["median_s"]  # floor time over measured = tok/s over the floor's
            text += f"; {share:.0%} of the floor's tok/s (target >= {GENERATION_FLOOR_FRACTION:.0%}): " + _at_least(
                share, GENERATION_FLOOR_FRACTION)
            ok = share >= GENERATION_FLOOR_FRACTION
            met = ok if met is None else (met and ok)
    else:
        text = ""
    compile_s = (rec.get("jax") or {}).get("compile_s")
    if text and compile_s is not None and applies:
        ok = compile_s < COMPILE_LIMIT_S
        text += f"; compile {compile_s:.1f} s (target < {COMPILE_LIMIT_S:.0f} s): " + ("met" if ok else "MISSED")
        met = ok if met is None else (met and ok)
    if not applies and text:
        text += " [indicative: targets are for bf16 / H100-class GPU / 7B]"
    return {"text": text, "met": met, "applies": applies}


def targets_apply(platform: str, dtype: str, shape: str, peaks) -> bool:
    """Whether issue 15's targets are defined for this run: bf16 on an H100-class GPU at a 7B shape."""
    return (platform == "gpu" and dtype == "bfloat16" and shape.endswith("7b")
            and bool(peaks and peaks.name.startswith(("H100", "H200"))))


def _ms(x: Optional[float]) -> str:
    return "n/a" if x is None else (f"{x * 1e3:.1f}" if x * 1e3 >= 1 else f"{x * 1e3:.3f}")


def _gib(x: Optional[int]) -> str:
    if x is None:
        return "n/a"
    return f"{x / GIB:.2f}" if x >= 0.01 * GIB else f"{x / GIB:.2g}"


COLUMNS = ("shape", "workload", "JAX ms", "torch ms", "torch/JAX", "arith floor ms", "mem floor ms", "JAX/floor",
           "compile s", "JAX peak GiB", "torch peak GiB", "JAX vs torch", "target")


def agreement_text(rec: dict) -> str:
    """Compact numerical agreement of the two sides (max abs differences; greedy token agreement)."""
    a = rec.get("agreement")
    if not a:
        return "n/a"
    if "metric_max_abs_diff" in a:
        return f"metric d={a['metric_max_abs_diff']:.1e}"
    if "last_logits_max_abs_diff" in a:
        return f"logits d={a['last_logits_max_abs_diff']:.1e}"
    if "greedy_token_agreement" in a:
        return f"{a['greedy_token_agreement']:.0%} tokens equal"
    return "n/a"


def table_rows(records: list) -> list:
    rows = []
    for r in records:
        if r.get("error"):
            rows.append((r["shape"], r["workload"]) + ("-",) * (len(COLUMNS) - 3) + (f"ERROR: {r['error']}",))
            continue
        j, t = r["jax"], r.get("torch")
        sp = _speedup(r)
        floor = r.get("floor_s")
        rows.append((r["shape"], r["workload"], _ms(j["median_s"]), _ms(t["median_s"]) if t else "n/a",
                     f"{sp:.2f}" if sp else "n/a", _ms(r.get("arith_floor_s")), _ms(r.get("memory_floor_s")),
                     f"{j['median_s'] / floor:.2f}" if floor else "n/a", f"{j['compile_s']:.2f}",
                     _gib(jax_peak_bytes(r)), _gib(t.get("peak_bytes")) if t else "n/a", agreement_text(r),
                     r["target"]["text"]))
    return rows


def format_text(records: list, header: str) -> str:
    rows = [COLUMNS] + table_rows(records)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(COLUMNS) - 1)]
    lines = [header]
    for row in rows:
        lines.append("  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w)
                               for i, (c, w) in enumerate(zip(row[:-1], widths))) + "  " + str(row[-1]))
    return "\n".join(lines)


def format_markdown(records: list, meta: dict) -> str:
    """A RESULTS.md-style section: run description, then the table."""
    device = meta["device_kind"] if meta["platform"] != "cpu" else f"CPU ({meta.get('host', 'unknown')})"
    lines = [f"### {device}, {meta['dtype']}, {meta['timestamp']}", "",
             f"- devices: JAX {meta['jax_version']} on {meta['device_kind']}; torch {meta['torch_version']} on "
             f"{meta['torch_device']} ({meta.get('torch_threads')} threads); transformers {meta['transformers_version']}"
             + (f"; XLA_FLAGS={meta['xla_flags']}" if meta.get("xla_flags") else "")
             + (f"; JAX weights layout {meta['layer_layout']}" if meta.get("layer_layout") else "")
             + (f"; JAX attention {meta['attention']}" if meta.get("attention") else "")
             + (f"; sweep scan bodies of {meta['group_layers']} layers" if meta.get("group_layers") else "")
             + ("; steering sweep unrolled" if meta.get("sweep_unroll") else ""),
             f"- sizes: {meta.get('sizes_text', meta['sizes'])}; median of {meta['repeats']} timed calls after one warm-up call",
             f"- floors: {meta['floors_note']}",
             "- JAX peak: allocator peak_bytes_in_use (cumulative over the process, weights included) where the "
             "backend reports it, else XLA's static plan of the executable (arguments + outputs + temps); torch peak: "
             "torch.cuda.max_memory_allocated per workload (weights included; n/a on CPU)",
             "- JAX vs torch: max abs difference of the layer-scan metric or of the last-position logits, or the share "
             "of equal greedy tokens (same weights; float32 agrees to ~1e-5, bf16 differs by rounding)",
             "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in table_rows(records):
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines) + "\n"
