"""Attention knockout: does removing the marker's attention to the function's tokens change predictions?

    python -m bin.ablation_experiment                         # single layer (heuristic), bundled model
    python -m bin.ablation_experiment --scan_layers --plot    # every layer, every sample, shared prefix
    python -m bin.ablation_experiment --layer_start=1 --layer_end=3
    python -m bin.ablation_experiment --scan_windows --window_center=2 --max_radius=3
    python -m bin.ablation_experiment --slide_window=3

Dispatch order as PLIP-rs: scan_layers -> slide_window -> scan_windows -> explicit window -> single layer.
KL(reference || knocked) is in nats at the last real position, from logits, in float64; the
reference is the no-op point of the same compiled program, and every table prints the noise floor it must
beat (per sample the larger of KL(baseline || reference) and the rounding floor: one precision unit of noise in
the residual stream). Knockout scans and window sweeps report Holm/BH-adjusted p.

Paper preset (PLIP-rs's knockout scan on Qwen2.5-Coder-7B-Instruct): `plip qwen7b_knockout_scan`, i.e.
`python -m bin.ablation_experiment --flagfile=configs/qwen7b_knockout_scan.flags`.
"""

from __future__ import annotations

from absl import flags

from plip_jax import cli

cli.define_model_flags(mesh="samples")
flags.DEFINE_string("corpus", None, "Universal-format corpus (default: the shipped one).")
cli.define_unknown_groups_flag()
flags.DEFINE_string("output", None, "JSON output (default: outputs/ablation_<mode>_<model>.json).")
cli.define_knockout_mode_flags("marker -> target attention", "PLIP's heuristic, n//2 for small models")
flags.DEFINE_bool("all_edges", False, "Knock out every later row -> marker column (marker invisible to later tokens).")
cli.define_int_list("heads", None, "Query heads to knock out, comma-separated (default: all).", minimum=0)
flags.DEFINE_string("logit_token", None, "Also report each sample's logit difference (baseline - knocked) of this "
                    "single token, e.g. '\\n' or ' assert'.")
flags.DEFINE_integer("sweep_batch", None, "Window sweeps: run this many windows per compiled program to bound "
                     "memory (each program carries its own no-op reference; default: all at once).")
flags.DEFINE_float("control_rel_tol", 0.1, "Mass-matched control: relative tolerance on the removed attention mass.")
flags.DEFINE_float("control_abs_tol", 0.002, "Mass-matched control: absolute tolerance on the removed attention "
                   "mass (the bound is max(rel_tol x mass, abs_tol)).")
flags.DEFINE_bool("plot", False, "Write a PNG next to the JSON.")
FLAGS = flags.FLAGS


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
    mode = cli.knockout_mode()
    return "ablation_" + {"layer": f"layer{target}", "window": f"layers{FLAGS.layer_start}_{FLAGS.layer_end}"}.get(mode, mode)


def main(argv):
    del argv
    run = cli.Run(output_name, model="transformer", corpus="universal", validate=validate)
    from plip_jax.experiments import causal_tables, knockout, plots

    model, corpus, mode = run.model, run.corpus, cli.knockout_mode()
    n = model.cfg.num_layers
    heads = list(FLAGS.heads) if FLAGS.heads else None
    windows = cli.knockout_windows(mode, n, knockout.default_intervention_layer(n))
    common = dict(heads=heads, all_edges=FLAGS.all_edges)
    if mode == "scan_layers":
        result = knockout.run_layer_scan_knockout(model, corpus, **common)
        print(causal_tables.knockout_scan(result))
    elif mode in ("slide_window", "scan_windows"):
        result = knockout.run_window_sweep(model, corpus, windows, sweep_batch=FLAGS.sweep_batch, **common)
        print(causal_tables.knockout_windows(result))
    else:
        ((start, end),) = windows
        result = knockout.run_knockout(model, corpus, layers=list(range(start, end + 1)),
                                       include_baselines=FLAGS.include_baselines,
                                       control_seed=None if FLAGS.control_seed < 0 else FLAGS.control_seed,
                                       control_rel_tol=FLAGS.control_rel_tol, control_abs_tol=FLAGS.control_abs_tol,
                                       logit_token=FLAGS.logit_token, **common)
        print(causal_tables.knockout_single(result))
    run.flags.update(mode=mode, heads=heads)
    return run.finish(result, record=("all_edges", "control_rel_tol", "control_abs_tol"), plot=plots.plot_knockout)


if __name__ == "__main__":
    cli.run(main)
