"""RWKV-6 state knockout: drop the marker position's WKV state write, KL(baseline || knocked) and the change of
the mean next-token NLL per sample, each beside its noise floor, Python doctests vs Rust tests (PLIP-rs
`state_ablation_experiment`, spec 5.4 and 6).

    python -m bin.state_ablation_experiment --model=RWKV/v6-Finch-1B6-HF              # layer floor(3n/5)
    python -m bin.state_ablation_experiment --model=DIR --layer=2 --include_baselines
    python -m bin.state_ablation_experiment --model=DIR --layer_start=1 --layer_end=3
    python -m bin.state_ablation_experiment --model=DIR --scan_layers                  # all samples, all layers
    python -m bin.state_ablation_experiment --model=DIR --scan_windows --window_center=2 --max_radius=5
    python -m bin.state_ablation_experiment --model=DIR --slide_window=3

Mode order as PLIP: --scan_layers, --slide_window, --scan_windows, --layer_start/--layer_end, single layer.
"""

from __future__ import annotations

from absl import flags

from plip_jax import cli

cli.define_model_flags(mesh=None)
cli.define_knockout_mode_flags("state contribution of the target tokens", "floor(3 * n_layers / 5), 14 for 24 layers")
flags.DEFINE_string("corpus", None, "Universal-format corpus (default: corpus/attention_samples_universal.json).")
cli.define_unknown_groups_flag()
flags.DEFINE_string("output", None, "JSON output (default: outputs/state_ablation_<model>_<mode>.json).")
flags.DEFINE_bool("verbose", False, "Print per-sample KLs, ΔNLLs and token positions.")
flags.DEFINE_integer("chunk", 64, "Forwards per vmapped step (bounds memory; 0 = all (sample, edit) pairs at once).")
flags.DEFINE_integer("control_max_offset", 2, "The control knocks out one position per sample at most this many "
                     "tokens from the marker (distance-matched to the read-out position; not a target token); a "
                     "sample with no such position is skipped from the control comparison and counted.")
flags.DEFINE_bool("plot", False, "Also write a PNG next to the JSON: KL mean ± s.e. per language for marker vs "
                  "control (single layer/window) or per layer/window (scans), with the noise floor drawn.")
FLAGS = flags.FLAGS


def state_layer(n: int) -> int:
    from plip_jax.experiments.rwkv_state.samples import default_state_layer

    return FLAGS.layer if FLAGS.layer is not None else default_state_layer(n)


def run_tag(n: int) -> str:
    """The mode part of the output name."""
    mode = cli.knockout_mode()
    if mode == "slide_window":
        return f"slide{FLAGS.slide_window}"
    if mode == "scan_windows":
        center = FLAGS.window_center if FLAGS.window_center is not None else state_layer(n)
        return f"windows_c{center}_r{FLAGS.max_radius}"
    if mode == "scan_layers":
        return mode
    ((start, end),) = cli.knockout_windows(mode, n, state_layer(n))
    return f"layer{start}" if start == end else f"layers{start}-{end}"


def validate(cfg):
    n = cfg.num_layers
    cli.check_layer("layer", n)
    cli.check_layer("window_center", n)
    cli.check_layer_range("layer_start", "layer_end", n, together=True)
    cli.check_count("slide_window", n, f"a window of at most the model's {n} layers")
    cli.check_at_least("max_radius", 0)
    cli.check_at_least("chunk", 0, "0 = all at once")


def main(argv):
    del argv
    run = cli.Run(lambda cfg: f"state_ablation_{{model}}_{run_tag(cfg.num_layers)}", model="rwkv6",
                  corpus="universal", validate=validate)
    from plip_jax.experiments.rwkv_state import ablation, plots as state_plots, samples as state_samples

    model = run.model
    samples, failures = state_samples.prepare_samples(model.tokenizer, run.corpus, FLAGS.include_baselines)
    n = model.cfg.num_layers
    print(f"Corpus: {run.corpus_path} — {len(samples)} samples usable"
          + (f", {len(failures)} skipped: {'; '.join(failures)}" if failures else ""))
    if FLAGS.verbose:
        for s in samples:
            print(f"  {s.id}: marker token {s.marker_token_pos}, targets {s.target_token_positions}, "
                  f"{len(s.token_ids)} tokens")
    mode = cli.knockout_mode()
    windows = cli.knockout_windows(mode, n, state_layer(n))
    if mode in ("scan_layers", "slide_window", "scan_windows"):
        result = ablation.run_knockout_windows(model, samples, windows, chunk=FLAGS.chunk or None, mode=mode)
        print(ablation.format_window_table(result))
        plot = state_plots.plot_windows
    else:
        ((start, end),) = windows
        seed = FLAGS.control_seed if FLAGS.control_seed >= 0 else None
        result = ablation.run_state_ablation(model, samples, start, end, control_seed=seed,
                                             control_max_offset=FLAGS.control_max_offset, chunk=FLAGS.chunk or None)
        print(ablation.format_ablation_summary(result, verbose=FLAGS.verbose))
        plot = state_plots.plot_ablation
    return run.finish(result, extra={"skipped_samples": failures}, plot=plot,
                      record=("layer", "layer_start", "layer_end", "scan_layers", "scan_windows", "window_center",
                              "max_radius", "slide_window", "include_baselines", "control_seed", "control_max_offset",
                              "chunk"))


if __name__ == "__main__":
    cli.run(main)
