"""`Run`: what every experiment binary does around its experiment, written once.

    def main(argv):
        run = cli.Run("layer_scan_universal", corpus="universal", validate=validate)  # checks, then load
        result = layer_scan.run_layer_scan(run.model, run.corpus, ...)                 # the experiment
        print(layer_scan.format_table(result))
        return run.finish(result, record=("start_layer",), plot=layer_scan.plot_layer_scan)

`Run(...)` starts up and checks everything it can before the model loads: float flags finite, the
multi-process runtime joined, config.json read (no weights) and the binary's `validate(cfg)` run on it
(layer, head, vocabulary bounds), the output path writable, the corpus loaded and validated. Then it loads
the model with a "loading" line. `finish(result)` adds provenance, writes the JSON atomically (process 0
only), the PNG when --plot, the HTML report when --report, and prints one final line: wall time and where
each output went.

One output convention: `--output` or `outputs/<name>_<model slug>.json`, the PNG next to it with the same
stem, the report in the same folder. A result is an object with `to_json()` or a dict (its own JSON).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

from absl import flags

from plip_jax.cli import distributed, flagtypes
from plip_jax.cli.startup import OUTPUT_DIR, check_family, load_model_from_flags
from plip_jax.data.corpus import STATE_GENERATE_PROMPTS_FILE, STATE_PERSISTENCE_PROMPTS_FILE
from plip_jax.util import io, progress

FLAGS = flags.FLAGS


class CorpusKind(NamedTuple):
    """How `Run` loads one kind of input file: `loader` (a function name in plip_jax.data.corpus) applied to the
    file named by --`flag` (else the shipped `default` under corpus/), with `kwargs`."""

    loader: str
    default: str
    flag: str = "corpus"
    kwargs: tuple = ()


CORPORA = {
    "universal": CorpusKind("load_universal_corpus", "attention_samples_universal.json"),
    "legacy": CorpusKind("load_legacy_corpus", "attention_samples.json"),
    "probe": CorpusKind("load_probe_samples", "samples.json"),
    "generation_prompts": CorpusKind("load_generation_prompts", "generation_prompts_n50.json"),
    "multi_snippets": CorpusKind("load_multi_snippets", "multi_sample_snippets.json", flag="snippets"),
    "state_generate_prompts": CorpusKind("load_state_prompts", STATE_GENERATE_PROMPTS_FILE),
    "state_persistence_prompts": CorpusKind("load_state_prompts", STATE_PERSISTENCE_PROMPTS_FILE,
                                            kwargs=(("need_distance", True),)),
}
OutputName = Union[str, Callable[[Any], str], None]


def _flag(name: str, default: Any = None) -> Any:
    return FLAGS[name].value if name in FLAGS else default


class Run:
    """One run of an experiment binary (see the module docstring).

    output: the default result name, `<name>_<model slug>.json` under outputs/ (a '{model}' placeholder puts
        the slug elsewhere), or a function of the model config giving it; None: write only with --output.
    model: "transformer" | "rwkv6" (that family only) | "any" | "tokenizer" (tokenizer only, no device) |
        None (no model).
    corpus: a kind of `CORPORA` ("universal", "legacy", "probe", "generation_prompts", "multi_snippets",
        "state_generate_prompts", "state_persistence_prompts"): loaded and validated from its flag (--corpus, or
        --snippets) else the shipped file, before the model; None: no corpus.
    validate: called with the model config before the weights load (raise FlagError for a bad flag).

    Attributes: model (LoadedModel), cfg, tokenizer, corpus, corpus_path, output (Path or None); the
    experiment may add to `timings`, `flags` and `extra` (recorded in the provenance) and set `status`
    (the exit status after writing, e.g. 1 when the run's own check failed)."""

    def __init__(self, output: OutputName, *, model: Optional[str] = "transformer", corpus: Optional[str] = None,
                 validate: Optional[Callable[[Any], None]] = None):
        from plip_jax.models import registry
        from plip_jax.models.sources import weight_files

        self.t0 = time.perf_counter()
        self.timings: dict = {}
        self.flags: dict = {}
        self.extra: dict = {}
        self.status = 0
        self.written: list[Path] = []
        self.model = self.cfg = self.tokenizer = self.source = None
        flagtypes.refuse_non_finite_floats()
        if model not in (None, "tokenizer"):
            distributed.initialize()
        if model is not None:
            self.source, family, self.cfg = registry.read_model_config(FLAGS.model)
            if model in ("transformer", "rwkv6"):
                check_family(family, model)
            if model != "tokenizer":
                weight_files(self.source.path)  # every weight file is there (a listing, nothing read)
        if validate is not None:
            validate(self.cfg)
        self.output = self._output_path(output)
        self.corpus_path, self.corpus = self._load_corpus(corpus)
        if model == "tokenizer":
            _, self.tokenizer = registry.load_tokenizer(FLAGS.model)
        elif model is not None:
            self.model, self.timings["load_s"] = load_model_from_flags()
            self.tokenizer = None
        self.t_ready = time.perf_counter()

    def _output_path(self, output: OutputName) -> Optional[Path]:
        if _flag("output"):
            path = Path(FLAGS.output)
        elif output is None:
            return None
        else:
            name = output(self.cfg) if callable(output) else output
            slug = self.source.slug if self.source is not None else "no_model"
            stem = name.format(model=slug) if "{model}" in name else f"{name}_{slug}"
            path = OUTPUT_DIR / f"{stem}.json"
        return io.check_output_path(path) if io.is_writer() else path

    def _load_corpus(self, kind: Optional[str]) -> tuple:
        if kind is None:
            return None, None
        from plip_jax.data import corpus as corpus_lib

        kind_ = CORPORA[kind]
        given = _flag(kind_.flag)
        path = Path(given) if given else corpus_lib.default_corpus_path(kind_.default)
        kwargs = dict(kind_.kwargs)
        if kind in ("universal", "legacy"):
            kwargs["allow_unknown_groups"] = bool(_flag("allow_unknown_groups", False))
        corpus = getattr(corpus_lib, kind_.loader)(path, **kwargs)
        skipped = dict(getattr(corpus, "skipped_groups", ()))
        if skipped:
            self.extra["skipped_corpus_groups"] = skipped
            progress.note(f"warning: {path}: skipped {sum(skipped.values())} sample(s) of unknown group(s) "
                          f"{', '.join(skipped)} (--allow_unknown_groups)")
        return path, corpus

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def provenance(self, result: Any, record: Sequence[str] = (), extra: Optional[dict] = None) -> dict:
        """The provenance block of `result`: model, corpus, versions, timings (load, run, the result's own),
        the recorded flags (`record` names, then `self.flags`) and `extra`."""
        from plip_jax.cli.provenance import provenance

        now = time.perf_counter()
        own = getattr(result, "timings", None)
        timings = {**self.timings, **(own if isinstance(own, dict) else {}), "run_s": now - self.t_ready,
                   "wall_s": now - self.t0}
        recorded = {name: _flag(name) for name in record}
        recorded.update(self.flags)
        more = {**self.extra, **(extra or {})}
        if self.model is None and self.source is not None:
            more.setdefault("tokenizer_of", self.source.name)
        return provenance(model=self.model, corpus_path=self.corpus_path,
                          dtype=self.model.dtype if self.model is not None else None, timings=timings,
                          flags=recorded or None, extra=more or None)

    def finish(self, result: Any, *, record: Sequence[str] = (), plot: Optional[Callable[[Any, Path], Any]] = None,
               extra: Optional[dict] = None) -> int:
        """Provenance, the JSON (atomic, process 0), the PNG(s) (`plot(result, png_path)` returning a path or a list
        of paths, when --plot is set or the binary has no --plot flag), the report (--report), the final line.
        Returns `self.status`."""
        payload = result.to_json() if hasattr(result, "to_json") else dict(result)
        payload["provenance"] = self.provenance(result, record, extra)
        if self.output is not None and io.is_writer():
            self.written.append(io.write_json(self.output, payload))
            if plot is not None and _flag("plot", True):
                pngs = plot(result, self.output.with_suffix(".png"))  # a path, or a list of paths
                self.written.extend(Path(p) for p in (pngs if isinstance(pngs, (list, tuple)) else [pngs]))
            if _flag("report", False):
                from plip_jax.report import write_report

                self.written.append(write_report(self.output.parent, model=self.model))
        print(self.final_line())
        return self.status

    def final_line(self) -> str:
        load = f"load {self.timings['load_s']:.1f}s, " if "load_s" in self.timings else ""
        head = f"done in {self.elapsed():.1f}s ({load}run {time.perf_counter() - self.t_ready:.1f}s)"
        if not io.is_writer():
            return f"{head}; this process writes nothing (process 0 writes the results)"
        if not self.written:
            return f"{head}; no file written (pass --output=PATH to save the result)"
        return f"{head}: {', '.join(str(p) for p in self.written)}"
