"""Run the benchmark: for each shape, build shared random weights (JAX + `transformers`), run the
selected workloads on both sides, add floors and targets. Returns a JSON-ready dict.

The platform must already be selected (`plip_jax.cli.select_device`) and, on GPU, JAX's preallocation
disabled (XLA_PYTHON_CLIENT_PREALLOCATE=false) so that torch can share the card; `benchmarks/bench.py` does both.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from typing import Callable, Optional, Sequence

import jax

from benchmarks.harness import harness, models, report
from benchmarks.harness import shapes as shp
from benchmarks.harness import workloads as wl


@dataclasses.dataclass
class Options:
    shapes: Sequence[str] = ("qwen2.5-coder-7b",)
    workloads: Sequence[str] = wl.WORKLOADS
    dtype: str = "bfloat16"
    repeats: int = 5
    sizes: wl.Sizes = wl.Sizes()
    with_torch: bool = True
    seed: int = 0
    layer_layout: str = "auto"  # JAX params layout (plip_jax.models.layers.resolve_layer_layout)
    group_layers: Optional[int] = None  # layers per compiled scan body of the knockout / steering engine
    attention: str = "explicit"  # Transformer.attention_impl ("fused": untouched blocks on a fused kernel)
    sweep_unroll: bool = False  # steering sweep: recomputed layers inline instead of scan bodies


def _host() -> str:
    """CPU model and core count of the machine (names the device of CPU runs)."""
    import os

    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def describe_sizes(s: wl.Sizes) -> str:
    return (f"corpus {s.samples} samples x {s.seq_len} tokens; steering doses {', '.join(f'{d:g}' for d in s.doses)}; "
            f"generation {s.gen_prompts} prompts of {max(s.gen_prompt_len // 2, 1)}..{s.gen_prompt_len} tokens x "
            f"{s.gen_tokens} new tokens")


def _meta(opts: Options, torch_device: str, peaks) -> dict:
    import transformers

    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "n/a"
    dev = jax.devices()[0]
    import os

    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:
        threads = None
    return {"platform": dev.platform, "host": _host(), "torch_threads": threads, "xla_flags": os.environ.get("XLA_FLAGS", ""), "device_kind": dev.device_kind, "jax_version": jax.__version__,
            "torch_version": torch_version, "transformers_version": transformers.__version__,
            "torch_device": torch_device if opts.with_torch else "n/a", "dtype": opts.dtype, "repeats": opts.repeats,
            "sizes": dataclasses.asdict(opts.sizes), "sizes_text": describe_sizes(opts.sizes),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "floors_note": (f"{peaks.name}: {peaks.source}; arithmetic floor = matmul FLOPs (2 x decoder params x "
                            f"tokens + causal attention QK/PV + unembedding where logits are computed) / achievable "
                            f"rate; memory floor = minimum HBM bytes (weights once per pass / per decode step, KV "
                            f"cache) / bandwidth" if peaks else
                            "n/a on this device (no roofline table entry; CPU floors are not reported)"),
            "peaks": dataclasses.asdict(peaks) if peaks else None,
            "layer_layout": _layout(opts.layer_layout), "attention": opts.attention,
            "group_layers": opts.group_layers, "sweep_unroll": opts.sweep_unroll}


def _layout(layout: str) -> str:
    from plip_jax.models.layers import resolve_layer_layout

    resolved = resolve_layer_layout(layout)
    return resolved if layout == resolved else f"{resolved} ({layout})"


def run(opts: Options, log: Callable[[str], None] = print, on_record: Optional[Callable[[dict], None]] = None) -> dict:
    """Benchmark every (shape, workload); a shape that does not fit is refused with a message (recorded,
    not raised); a workload that fails is recorded with its error and the run goes on. `on_record(result)`
    is called with the partial result after each workload (e.g. to save it as it goes)."""
    platform = jax.devices()[0].platform
    torch_device = "cpu"
    if opts.with_torch:
        import torch

        torch_device = "cuda" if platform == "gpu" and torch.cuda.is_available() else "cpu"
        if platform == "gpu" and torch_device == "cpu":
            log("warning: JAX runs on GPU but torch sees no CUDA device; the torch side runs on CPU")
    peaks = harness.device_peaks(jax.devices()[0].device_kind, platform, opts.dtype)
    meta = _meta(opts, torch_device, peaks)
    records, refused = [], []
    for name in opts.shapes:
        cfg = shp.model_config(name)
        hf_cfg = shp.hf_config_dict(name)
        log(shp.describe(name, cfg))
        problem = models.check_fits(name, cfg, opts.dtype, platform, opts.with_torch,
                                    harness.available_memory_bytes(platform))
        if problem:
            log("REFUSED: " + problem)
            refused.append({"shape": name, "reason": problem})
            continue
        t0 = time.perf_counter()
        torch_model = None
        if opts.with_torch:
            torch_model = models.build_torch_model(hf_cfg, opts.dtype, torch_device, opts.seed)
            model = models.model_from_torch(torch_model, cfg, opts.dtype, opts.layer_layout)
        else:
            model = models.random_model(cfg, opts.dtype, opts.seed, std=float(hf_cfg.get("initializer_range", 0.02)),
                                        layer_layout=opts.layer_layout)
        model = jax.block_until_ready(model.with_attention(opts.attention))
        log(f"  weights ready in {time.perf_counter() - t0:.1f} s")
        applies = report.targets_apply(platform, opts.dtype, name, peaks)
        corpus = wl.make_corpus(cfg, opts.sizes.samples, opts.sizes.seq_len, opts.seed)
        for w in opts.workloads:
            log(f"  {w} ...")
            t1 = time.perf_counter()
            try:
                if w == "layer_scan":
                    rec = wl.layer_scan(model, corpus, opts.repeats, torch_model, torch_device, opts.dtype)
                elif w == "knockout_scan":
                    bs = opts.sizes.knockout_batch or wl.knockout_batch_size(
                        cfg, opts.sizes.samples, opts.sizes.seq_len,
                        harness.available_memory_bytes(platform) if platform != "cpu" else None)
                    rec = wl.knockout_scan(model, corpus, opts.repeats, torch_model, torch_device, opts.dtype, bs,
                                           group_layers=opts.group_layers)
                elif w == "steering_sweep":
                    rec = wl.steering_sweep(model, corpus, opts.repeats, torch_model, torch_device,
                                            opts.dtype, opts.sizes.doses, group_layers=opts.group_layers,
                                            unroll=opts.sweep_unroll)
                elif w == "generation":
                    prompts = wl.make_prompts(cfg, opts.sizes.gen_prompts, opts.sizes.gen_prompt_len, opts.seed + 1)
                    rec = wl.generation(model, prompts, opts.sizes.gen_tokens, opts.repeats, torch_model,
                                               torch_device, opts.dtype)
                else:
                    raise ValueError(f"unknown workload {w!r}; known: {', '.join(wl.WORKLOADS)}")
            except Exception as e:  # noqa: BLE001 - keep going, record the failure
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                log(f"    failed: {msg}")
                records.append({"shape": name, "workload": w, "error": msg})
                continue
            rec.update(shape=name, workload=w)
            report.add_floors(rec, peaks)
            rec["target"] = report.evaluate_target(rec, applies)
            records.append(rec)
            log(f"    done in {time.perf_counter() - t1:.1f} s: JAX {rec['jax']['median_s'] * 1e3:.2f} ms" +
                (f", torch {rec['torch']['median_s'] * 1e3:.2f} ms" if rec.get("torch") else ""))
            if on_record is not None:
                on_record({"meta": meta, "records": records, "refused": refused})
        del model, torch_model
        _free_memory(torch_device if opts.with_torch else None)
    return {"meta": meta, "records": records, "refused": refused}


def _free_memory(torch_device) -> None:
    """Release the shape's weights before the next shape (both sides share one GPU)."""
    import gc

    gc.collect()
    jax.clear_caches()
    if torch_device == "cuda":
        import torch

        torch.cuda.empty_cache()


def text_table(result: dict) -> str:
    m = result["meta"]
    device = m["device_kind"] if m["platform"] != "cpu" else f"CPU ({m['host']})"
    header = (f"plip-jax benchmark on {device}, {m['dtype']}, median of {m['repeats']}; torch on {m['torch_device']}\n"
              f"sizes: {m['sizes_text']}\nfloors: {m['floors_note']}")
    out = report.format_text(result["records"], header)
    for r in result["refused"]:
        out += f"\nREFUSED {r['shape']}: {r['reason']}"
    return out


def markdown(result: dict) -> str:
    out = report.format_markdown(result["records"], result["meta"])
    for r in result["refused"]:
        out += f"\nRefused {r['shape']}: {r['reason']}\n"
    return out

