"""Which heads carry it: a per-(layer, head) causal map of the marker -> function-token attention.

For every sample and every (layer, query head) cell, the marker -> target edges of that one head at that one
layer are knocked out (exact: all cells of a sample in one compiled computation on the shared-prefix engine),
and/or the first-order effect of every cell is read from one backward pass (gradient: attribution patching
with a continuous knockout strength). Per cell: KL(baseline || knocked) and the change of the baseline top-1
token's log-probability, its noise floor, Python vs Rust (exact permutation test of the language labels, BH q
over all cells), and the rank agreement of the gradient estimate with the exact grid.

    python -m bin.head_map --plot                       # bundled model, both methods
    python -m bin.head_map --method=gradient            # one forward + backward per sample
    python -m bin.head_map --model=Qwen/Qwen2.5-Coder-7B-Instruct --dtype=float32 --cells_per_call=112
"""

from __future__ import annotations

from absl import flags

from plip_jax import cli

cli.define_model_flags(mesh="samples")
flags.DEFINE_string("corpus", None, "Universal-format corpus (default: the shipped one).")
cli.define_unknown_groups_flag()
flags.DEFINE_string("output", None, "JSON output (default: outputs/head_map_<model>.json).")
flags.DEFINE_enum("method", "both", ["exact", "gradient", "both"], "exact: the knockout grid; gradient: attribution "
                  "patching (first-order estimate of the change of log p(top-1)); both: and their agreement.")
flags.DEFINE_integer("cells_per_call", 64, "Exact grid: (layer, head) cells per call (bounds memory: each cell holds "
                     "one residual stream per sample). At >= the layer count every call runs the same compiled program.")
flags.DEFINE_integer("max_samples", None, "At most this many samples per language (default: all).")
flags.DEFINE_integer("seed", 0, "Seed of the Monte Carlo permutation tests (only used above 200,000 relabelings).")
flags.DEFINE_bool("plot", False, "Write heatmaps next to the JSON (Python, Rust, difference; exact vs gradient).")
FLAGS = flags.FLAGS


def validate(cfg):
    cli.check_at_least("cells_per_call", 1)
    cli.check_at_least("max_samples", 2)


def main(argv):
    del argv
    run = cli.Run("head_map", model="transformer", corpus="universal", validate=validate)
    from plip_jax.experiments import head_map
    from plip_jax.experiments.causal_samples import distributor

    with cli.Status("head map") as status:
        result = head_map.run_head_map(run.model, run.corpus, method=FLAGS.method,
                                       cells_per_call=FLAGS.cells_per_call, seed=FLAGS.seed,
                                       max_samples=FLAGS.max_samples, distribute=distributor(run.model),
                                       progress=status)
    print(head_map.format_head_map(result))
    return run.finish(result, record=("method", "cells_per_call", "max_samples", "seed"), plot=head_map.plot_head_map)


if __name__ == "__main__":
    cli.run(main)
