"""Layer windows for knockout sweeps (PLIP-rs `--scan-windows` / `--slide-window`), shared by the
attention knockout and the RWKV-6 state knockout experiments. Windows are (start, end) inclusive."""

from __future__ import annotations

from plip_jax.core.interventions import InterventionError


def radius_windows(center: int, max_radius: int, n_layers: int) -> list[tuple[int, int]]:
    """--scan_windows: [max(0, c - r), min(n - 1, c + r)] for r = 0..max_radius (clamped at the ends, as PLIP)."""
    if not 0 <= center < n_layers:
        raise InterventionError(f"--window_center={center} out of range: the model has {n_layers} layers "
                                f"(valid 0..{n_layers - 1})")
    return [(max(0, center - r), min(n_layers - 1, center + r)) for r in range(max_radius + 1)]


def sliding_windows(width: int, n_layers: int) -> list[tuple[int, int]]:
    """--slide_window W: [s, s + W - 1] for s = 0..n - W."""
    if not 1 <= width <= n_layers:
        raise InterventionError(f"--slide_window={width} must be between 1 and the {n_layers} layers")
    return [(s, s + width - 1) for s in range(n_layers - width + 1)]
