"""List the models plip-jax can run without a download: the bundled model and the HF hub cache
(HF_HUB_CACHE / HF_HOME), with model_type, architecture, support and size on disk.

    python -m bin.list_models
    python -m bin.list_models --cache_dir=/data/hf/hub --output=outputs/models.json
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from plip_jax import cli

flags.DEFINE_string("cache_dir", None, "HF hub cache to scan (default: HF_HUB_CACHE, else $HF_HOME/hub).")
flags.DEFINE_bool("supported_only", False, "Only list models plip-jax supports.")
flags.DEFINE_string("output", None, "Optional JSON output.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from plip_jax.models import hf_cache

    out = cli.check_output_path(FLAGS.output) if FLAGS.output else None
    cache = Path(FLAGS.cache_dir) if FLAGS.cache_dir else hf_cache.hub_cache_dir()
    models = hf_cache.list_models(cache)
    if FLAGS.supported_only:
        models = [m for m in models if m.supported]
    print(hf_cache.format_models(models, cache))
    if out:
        print(f"Wrote {cli.write_json(out, {'cache_dir': str(cache), 'models': [m.to_json() for m in models]})}")


if __name__ == "__main__":
    cli.run(main)
