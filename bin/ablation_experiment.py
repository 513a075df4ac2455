"""Attention knockout: does removing the marker's attention to the function's tokens change predictions?

    python -m bin.ablation_experiment                         # single layer (heuristic), bundled model
    python -m bin.ablation_experiment --scan_layers --plot    # every layer, every sample, shared prefix
    python -m bin.ablation_experiment --layer_start=1 --layer_end=3
    python -m bin.ablation_experiment --scan_windows --window_center=2 --max_radius=3
    python -m bin.ablation_experiment --slide_window=3

Dispatch order as PLIP-rs: scan_layers -> slide_window -> scan_windows -> explicit window -> single layer.
KL(baseline || knocked) is in nats at the last real position, from logits.

Paper preset (PLIP-rs's knockout scan on Qwen2.5-Coder-7B-Instruct): `plip qwen7b_knockout_scan`, i.e.
`python -m bin.ablation_experiment --flagfile=configs/qwen7b_knockout_scan.flags`.
"""

from __future__ import annotations

from absl import flags

from plip_jax import cli
from plip_jax.analysis import stats

cli.define_model_flags(mesh="samples")
flags.DEFINE_string("corpus", None, "Universal-format corpus (default: the shipped one).")
cli.define_unknown_groups_flag()
flags.DEFINE_string("output", None, "JSON output (default: outputs/ablation_<mode>_<model>.json).")
cli.define_knockout_mode_flags("marker -> target attention", "PLIP's heuristic, n//2 for small models")
flags.DEFINE_bool("all_edges", False, "Knock out every later row -> marker column (marker invisible to later tokens).")
cli.define_int_list("heads", None, "Query heads to knock out, comma-separated (default: all).", minimum=0)
flags.DEFINE_string("logit_token", None, "Also report each sample's logit difference (baseline - knocked) of this "
                    "single token, e.g. '\\n' or ' assert'.")
flags.DEFINE_integer("sweep_batch", None, "Run this many sweep points (windows / doses) at a time to bound "
                     "memory (default: all at once).")
flags.DEFINE_bool("plot", False, "Write a PNG next to the JSON.")
FLAGS = flags.FLAGS


def knockout_mode() -> str:
    """PLIP-rs's dispatch order: scan_layers -> slide_window -> scan_windows -> explicit window -> single layer."""
    if FLAGS.scan_layers:
        return "scan_layers"
    if FLAGS.slide_window:
        return "slide_window"
    if FLAGS.scan_windows:
        return "scan_windows"
    return "window" if FLAGS.layer_start is not None or FLAGS.layer_end is not None else "layer"


def validate(cfg):
    n = cfg.num_layers
    cli.check_layer("layer", n)
    cli.check_layer("window_center", n)
    cli.check_layer_range("layer_start", "layer_end", n, together=True)
    cli.check_heads("heads", cfg.num_heads)
    cli.check_count("slide_window", n, f"a window of at most the model's {n} layers")
    cli.check_at_least("max_radius", 0)
    cli.check_at_least("sweep_batch", 1)


def output_name(cfg):
    from plip_jax.experiments import knockout

    target = FLAGS.layer if FLAGS.layer is not None else knockout.default_intervention_layer(cfg.num_layers)
    mode = knockout_mode()
    return "ablation_" + {"layer": f"layer{target}", "window": f"layers{FLAGS.layer_start}_{FLAGS.layer_end}"}.get(mode, mode)


def main(argv):
    del argv
    run = cli.Run(output_name, model="transformer", corpus="universal", validate=validate)
    from plip_jax.experiments import knockout, plots
    from plip_jax.experiments import windows as windows_lib

    model, corpus, mode = run.model, run.corpus, knockout_mode()
    n = model.cfg.num_layers
    heads = list(FLAGS.heads) if FLAGS.heads else None
    target = FLAGS.layer if FLAGS.layer is not None else knockout.default_intervention_layer(n)
    common = dict(heads=heads, all_edges=FLAGS.all_edges)
    if mode == "scan_layers":
        result = knockout.run_layer_scan_knockout(model, corpus, **common)
        print(knockout_table_scan(result))
    elif mode in ("slide_window", "scan_windows"):
        if mode == "slide_window":
            windows = windows_lib.sliding_windows(FLAGS.slide_window, n)
        else:
            center = FLAGS.window_center if FLAGS.window_center is not None else target
            windows = windows_lib.radius_windows(center, FLAGS.max_radius, n)
        result = knockout.run_window_sweep(model, corpus, windows, sweep_batch=FLAGS.sweep_batch, **common)
        print(knockout_table_windows(result))
    else:
        layers = list(range(FLAGS.layer_start, FLAGS.layer_end + 1)) if mode == "window" else [target]
        result = knockout.run_knockout(model, corpus, layers=layers, include_baselines=FLAGS.include_baselines,
                                       control_seed=None if FLAGS.control_seed < 0 else FLAGS.control_seed,
                                       logit_token=FLAGS.logit_token, **common)
        print(knockout_table_single(result))
    run.flags.update(mode=mode, heads=heads)
    return run.finish(result, record=("all_edges",), plot=plots.plot_knockout)


def _fmt_stats(s):
    return "n/a" if not s else f"{s['mean_kl']:.3e} ± {s['std_kl']:.1e} (n={s['n_samples']})"


def knockout_table_single(r: dict) -> str:
    where = f"layer {r['layer']}" if "layer" in r else f"layers {r['layer_start']}..{r['layer_end']}"
    lines = [f"Knockout at {where} ({r['edge_set']}), KL(baseline || knocked) in nats at the last token:",
             f"{'sample':<28} {'KL':>11} {'control KL':>11} top-1 kept"]
    for s in r["sample_results"]:
        ctl = s.get("control_kl_divergence")
        lines.append(f"{s['id']:<28} {s['kl_divergence']:>11.3e} {'' if ctl is None else f'{ctl:.3e}':>11} "
                     f"{'yes' if s['top1_agreement'] else 'NO'}")
    lines += [f"Python: {_fmt_stats(r['python_stats'])}", f"Rust:   {_fmt_stats(r['rust_stats'])}",
              f"Welch t = {stats.fmt_stat(r['welch_t_statistic'], '.3f')}, df = {stats.fmt_stat(r['welch_df'], '.2f')}, "
              f"p = {stats.fmt_stat(r['welch_p_value'])}"
              f"{' (significant)' if r['significant_difference'] else ''}"]
    for lang in ("python", "rust"):
        c = r.get("random_edge_control", {}).get(lang)
        if c:
            lines.append(f"{lang} knockout vs random-edge control: mean ΔKL = {c['mean_diff']:.3e}, paired t p = "
                         f"{c['t_p_value']:.4g}, Wilcoxon p = {c['wilcoxon_p_value']:.4g}")
    for s in r.get("skipped_samples", []):
        lines.append(f"skipped {s['id']}: {s['reason']}")
    return "\n".join(lines)


def knockout_table_scan(r: dict) -> str:
    lines = [f"{'layer':>5} {'Python KL':>11} {'Rust KL':>11} {'ratio':>8} {'p':>9}"]
    for p in r["per_layer"]:
        py, rs = p["python_stats"], p["rust_stats"]
        ratio = py["mean_kl"] / max(rs["mean_kl"], 1e-10) if py and rs else float("nan")
        lines.append(f"{p['layer']:>5} {py['mean_kl']:>11.3e} {rs['mean_kl']:>11.3e} {ratio:>8.2f} "
                     f"{stats.fmt_stat(p['welch_p_value'], '>9.3g')}")
    for lang in ("python", "rust"):
        top = sorted(r["per_layer"], key=lambda p: -p[f"{lang}_stats"]["mean_kl"])[:5]
        lines.append(f"Top-5 layers by {lang} KL: " + ", ".join(f"L{p['layer']}" for p in top))
    return "\n".join(lines)


def knockout_table_windows(r: dict) -> str:
    lines = [f"{'window':>9} {'Python KL':>11} {'Rust KL':>11} {'ratio':>8} {'p':>9}"]
    for w in r["windows"]:
        lines.append(f"{w['layer_start']:>4}..{w['layer_end']:<3} {w['python_stats']['mean_kl']:>11.3e} "
                     f"{w['rust_stats']['mean_kl']:>11.3e} {w['ratio']:>8.2f} {stats.fmt_stat(w['welch_p_value'], '>9.3g')}")
    peak = max(r["windows"], key=lambda w: w["ratio"])
    lines.append(f"Largest Python/Rust ratio: {peak['ratio']:.2f} at layers {peak['layer_start']}..{peak['layer_end']}")
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run(main)
