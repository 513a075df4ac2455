"""The four benchmark workloads, each timed on the JAX side (the library's entry point) and on the
`transformers` side (PyTorch, eager attention, same weights, same dtype), in the same process.

* layer_scan: PLIP's marker -> targets attention metric for every layer and sample [B, L].
  JAX: `attention_metric.marker_metric` (one batched forward, marker rows reduced on device).
  torch: one batched forward with `output_attentions=True` (logits of the last row only), same reduction.
* knockout_scan: baseline + one knockout of the marker -> target edges per layer, every layer: last
  logits [B, L+1, V] and next-token NLL [B, L+1].
  JAX: `causal.layer_knockout_scan` (baseline layers and rows shared, plus the no-op reference, one call). torch: L+1 forwards, the knocked layer's
  attention gets the edges masked (finfo.min) through a forward pre-hook on its `self_attn` that edits the
  4-D additive `attention_mask` (HF's own eager attention code runs unchanged).
* steering_sweep: Scale(f) of the marker -> target edges at one layer for 6 doses: last logits, NLL and
  the marker's attention rows [S, B, ...].
  JAX: `causal.shared_sweep` (the library's steering engine: baseline, no-op reference and every dose in one
  compiled call; layers below the steered one and rows before the marker shared). torch: one forward per dose
  with a pre-hook adding log(f) to the edges' scores, which is exactly Scale(f) with row renormalisation
  (softmax(s + log f * m) = p * f^m / sum(p * f^m)); `output_attentions=True` for the marker rows.
* generation: greedy batched generation of `new_tokens` tokens for prompts of varied lengths, no stop
  token. JAX: `generation.generate` (one jitted prefill + while-loop decode). torch: `model.generate`
  with left padding, `do_sample=False`, `min_new_tokens = max_new_tokens`.

Inputs are random tokens (random weights make real text pointless); markers sit in the second half of
each sample, with 3 distinct earlier target tokens, as in the PLIP corpus.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import harness, shapes
from plip_jax.models.config import ModelConfig

WORKLOADS = ("layer_scan", "knockout_scan", "steering_sweep", "generation")
DEFAULT_DOSES = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0)  # bin/steering_experiment's default Scale doses


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Workload sizes: corpus of `samples` x `seq_len` tokens; `doses` steering doses; `gen_prompts`
    prompts of `gen_prompt_len // 2 .. gen_prompt_len` tokens, `gen_tokens` new tokens each;
    `knockout_batch` samples per knockout-scan call (0 = automatic, see `knockout_batch_size`)."""

    samples: int = 20
    seq_len: int = 64
    doses: tuple = DEFAULT_DOSES
    gen_prompts: int = 50
    gen_prompt_len: int = 64
    gen_tokens: int = 150
    knockout_batch: int = 0  # samples per knockout-scan call (0: all, or fewer when activations would not fit)


TINY_SIZES = Sizes(samples=4, seq_len=16, gen_prompts=4, gen_prompt_len=8, gen_tokens=8)


@dataclasses.dataclass
class Corpus:
    """Random corpus: tokens int32 [B, T], lengths int32 [B], markers int32 [B], targets [B] lists of 3
    positions < marker, counts float32 [B, T] (target multiplicities), edges bool [B, T, T] (marker -> targets)."""

    tokens: np.ndarray
    lengths: np.ndarray
    markers: np.ndarray
    targets: list
    counts: np.ndarray
    edges: np.ndarray


def make_corpus(cfg: ModelConfig, samples: int, seq_len: int, seed: int = 0) -> Corpus:
    rng = np.random.RandomState(seed)
    tokens = rng.randint(3, cfg.vocab_size, size=(samples, seq_len)).astype(np.int32)
    lengths = np.full((samples,), seq_len, np.int32)
    markers = rng.randint(max(seq_len // 2, 4), seq_len, size=samples).astype(np.int32)
    counts = np.zeros((samples, seq_len), np.float32)
    edges = np.zeros((samples, seq_len, seq_len), bool)
    targets = []
    for b, m in enumerate(markers):
        tg = sorted(rng.choice(np.arange(1, m), size=3, replace=False).tolist())
        targets.append(tg)
        counts[b, tg] = 1.0
        edges[b, m, tg] = True
    return Corpus(tokens, lengths, markers, targets, counts, edges)


def steering_layer(cfg: ModelConfig) -> int:
    """The steered layer: the middle one (PLIP's default for the steering experiment)."""
    return cfg.num_layers // 2


# --------------------------------------------------------------------------- records


def _jax_record(timing: harness.Timing, compile_s: Optional[float], xla_mem: Optional[dict]) -> dict:
    stats = harness.jax_memory_stats() or {}
    return {"median_s": timing.median_s, "times_s": timing.times_s, "first_call_s": timing.first_s,
            "compile_s": compile_s if compile_s is not None else timing.first_minus_median_s,
            "compile_method": "lower().compile() wall time" if compile_s is not None else "first call - median",
            "xla_memory_bytes": xla_mem,
            "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
            "bytes_in_use": stats.get("bytes_in_use")}


def _torch_record(timing: harness.Timing, device: str) -> dict:
    return {"median_s": timing.median_s, "times_s": timing.times_s, "first_call_s": timing.first_s,
            "peak_bytes": harness.torch_peak_bytes(device)}


def _aot(fn, *args, **static):
    """(compiled executable, wall seconds of lower + compile, XLA memory plan)."""
    import time

    t = time.perf_counter()
    compiled = fn.lower(*args, **static).compile()
    return compiled, time.perf_counter() - t, harness.xla_memory_bytes(compiled)


def _torch_inputs(corpus: Corpus, device: str):
    import torch

    ids = torch.as_tensor(corpus.tokens, dtype=torch.long, device=device)
    mask = (torch.arange(corpus.tokens.shape[1], device=device)[None] <
            torch.as_tensor(corpus.lengths, device=device)[:, None]).long()
    return ids, mask


def _edit_mask_hook(edges, add: Optional[float]):
    """Forward pre-hook for a `self_attn` module: edges (bool torch [B, T, T]) of the 4-D additive
    attention_mask get finfo.min (add=None: knockout) or + add (log of a Scale factor)."""
    import torch

    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        q = kwargs.get("hidden_states", args[0] if args else None)
        dtype = q.dtype
        b, t = edges.shape[0], edges.shape[1]
        if mask is None:
            causal = torch.ones(t, t, dtype=torch.bool, device=edges.device).tril()
            mask = torch.zeros(b, 1, t, t, dtype=dtype, device=edges.device).masked_fill(~causal, torch.finfo(dtype).min)
        elif mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        e = edges[:, None, :, : mask.shape[-1]]
        if add is None:
            mask = mask.masked_fill(e, torch.finfo(mask.dtype).min)
        else:
            mask = mask + e.to(mask.dtype) * add
        kwargs["attention_mask"] = mask
        return args, kwargs

    return hook


def _torch_nll(logits, ids, lengths):
    """Mean next-token NLL [B] (nats) of positions 0..length-2, as `plip_jax.analysis.metrics.sequence_nll`."""
    import torch

    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok = torch.gather(lp, -1, ids[:, 1:, None])[..., 0]
    valid = torch.arange(ids.shape[1] - 1, device=ids.device)[None] < (lengths[:, None] - 1)
    return -(tok * valid).sum(-1) / valid.sum(-1)


def _last_rows(logits, lengths):
    import torch

    return logits[torch.arange(logits.shape[0], device=logits.device), lengths - 1].float()


def _max_abs(a: Any, b: Any) -> float:
    return float(np.nanmax(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# --------------------------------------------------------------------------- workloads


def layer_scan(model, corpus: Corpus, repeats: int, torch_model=None, torch_device: str = "cpu",
               dtype: str = "float32") -> dict:
    """Time the layer-scan metric [B, L]; returns the workload record (see module doc)."""
    from plip_jax.experiments.attention_metric import marker_metric

    cfg = model.cfg
    trunk = model.trunk()  # the scan reads no logits: lm_head stays out of the call's buffers
    args = tuple(jnp.asarray(x) for x in (corpus.tokens, corpus.lengths, corpus.markers[:, None], corpus.counts))
    compiled, compile_s, xla_mem = _aot(marker_metric, trunk, *args)
    timing, out = harness.time_calls(lambda: compiled(trunk, *args), repeats, harness.jax_sync)
    rec = {"jax": _jax_record(timing, compile_s, xla_mem), "torch": None}
    jax_metric = np.asarray(out, np.float64)
    lens = corpus.lengths.tolist()
    rec["flops"] = shapes.forward_flops(cfg, lens)
    rec["bytes"] = shapes.pass_bytes(cfg, dtype, with_head=False)
    rec["tokens"] = int(sum(lens))
    rec["result_summary"] = {"metric_mean": float(np.nanmean(jax_metric))}
    if torch_model is not None:
        import torch

        ids, mask = _torch_inputs(corpus, torch_device)
        markers = torch.as_tensor(corpus.markers, dtype=torch.long, device=torch_device)
        counts = torch.as_tensor(corpus.counts, device=torch_device)

        def run():
            with torch.no_grad():
                o = torch_model(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False,
                                logits_to_keep=1)
                att = torch.stack(o.attentions, 1)  # [B, L, H, T, T]
                rows = att[torch.arange(att.shape[0], device=att.device), :, :, markers].float().mean(2)  # [B, L, T]
                return torch.einsum("blt,bt->bl", rows, counts) / counts.sum(-1, keepdim=True)

        harness.torch_reset_peak(torch_device)
        t_timing, t_out = harness.time_calls(run, repeats, harness.torch_sync(torch_device))
        rec["torch"] = _torch_record(t_timing, torch_device)
        rec["agreement"] = {"metric_max_abs_diff": _max_abs(jax_metric, t_out.cpu().numpy()),
                            "metric_scale": float(np.nanmax(np.abs(jax_metric)))}
        rec["jax_metric"] = jax_metric.tolist() if jax_metric.size <= 4096 else None
        rec["torch_metric"] = t_out.cpu().double().numpy().tolist() if jax_metric.size <= 4096 else None
    return rec


def knockout_batch_size(cfg: ModelConfig, samples: int, seq_len: int, available: Optional[int]) -> int:
    """Samples per `layer_knockout_scan` call: all of them unless one sample's activations of every stream
    ([L+1, T] rows: residual, MLP intermediates, f32 attention probabilities; the NLL is vocabulary-chunked,
    so no [T, V] logits) would push the call past a quarter of the device memory; then the largest divisor of
    `samples` that fits (one executable)."""
    if not available:
        return samples
    rows = (cfg.num_layers + 1) * seq_len
    per_sample = rows * (2 * cfg.hidden_size + 6 * cfg.intermediate_size + 12 * cfg.num_heads * seq_len)
    limit = max(1, int(available // 4 // per_sample))
    return max(d for d in range(1, samples + 1) if samples % d == 0 and d <= limit)


def _group_layers(group_layers: Optional[int]) -> int:
    """Layers per compiled scan body of the shared-prefix engine: the given size, else the library's default."""
    from plip_jax.experiments import causal

    return causal.DEFAULT_GROUP_LAYERS if group_layers is None else int(group_layers)


@dataclasses.dataclass
class KnockoutProgram:
    """The all-layer knockout scan's compiled call over one chunk of samples (`knockout_program`)."""

    compiled: Any
    model: Any
    chunks: list  # [(tokens, lengths, edges, heads, window starts, first rows)] of batch_size samples
    compile_s: float
    xla_mem: Optional[dict]
    window_rows: int  # rows per sample's attention window (the others are the baseline's)
    packed_rows: Optional[int]  # rows of all samples the matrix products cover when packed (None: the windows)
    group_layers: int
    flops: float  # the engine's matmul work over all chunks

    def run(self):
        outs = [self.compiled(self.model, *c[:5], firsts=c[5]) for c in self.chunks]
        return outs[0] if len(outs) == 1 else jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *outs)


def knockout_program(model, corpus: Corpus, batch_size: Optional[int] = None,
                     group_layers: Optional[int] = None) -> KnockoutProgram:
    """Compile the all-layer knockout scan (`causal.layer_knockout_scan_jit`: baseline + no-op reference + L
    single-layer knockouts of marker -> targets) for calls of `batch_size` samples (None: all in one call)."""
    from plip_jax.experiments import causal

    g_layers = _group_layers(group_layers)
    cfg = model.cfg
    b = corpus.tokens.shape[0]
    bs = b if not batch_size else int(batch_size)
    if b % bs:
        raise ValueError(f"knockout batch size {bs} must divide the {b} samples")
    heads = np.ones((b, cfg.num_heads), bool)
    # the rows recomputed per sample; packed (each sample's rows from its first knocked row) in one call
    windows = causal.knockout_windows(corpus.edges, corpus.lengths, pack=bs == b)
    firsts = windows.firsts if windows.packed else windows.starts  # (unused unpacked)
    full = tuple(jnp.asarray(x) for x in (corpus.tokens, corpus.lengths, corpus.edges, heads, windows.starts, firsts))
    chunks = [tuple(x[i:i + bs] for x in full) for i in range(0, b, bs)]
    compiled, compile_s, xla_mem = _aot(causal.layer_knockout_scan_jit, model, *chunks[0][:5],
                                        firsts=chunks[0][5], width=windows.width, group_layers=g_layers,
                                        packed_rows=windows.packed_rows)
    L = cfg.num_layers
    lens = corpus.lengths.tolist()
    # the work the engine does: the baseline (L blocks, all rows) + the no-op reference (L blocks) + for the
    # run knocked at layer k, L - entry(k) blocks (entry = k rounded down to a multiple of the group size),
    # over each sample's rows from its first knocked query row (earlier rows are the baseline's)
    g = max(1, min(g_layers, L))
    blocks = L + sum(L - k // g * g for k in range(L))
    flops = (shapes.forward_flops(cfg, lens, logits_rows_per_sample=1) +
             shapes.recomputed_flops(cfg, windows, len(lens), blocks, L + 1))
    return KnockoutProgram(compiled, model, chunks, compile_s, xla_mem, windows.width, windows.packed_rows, g_layers,
                           flops)


def knockout_scan(model, corpus: Corpus, repeats: int, torch_model=None, torch_device: str = "cpu",
                  dtype: str = "float32", batch_size: Optional[int] = None, group_layers: Optional[int] = None) -> dict:
    """Time the all-layer knockout scan of `knockout_program` against L + 1 transformers forwards (a hook on
    the knocked layer); group_layers: layers per compiled scan body (None: the library's default; fewer
    bodies compile faster, larger groups recompute more)."""
    prog = knockout_program(model, corpus, batch_size, group_layers)
    timing, out = harness.time_calls(prog.run, repeats, harness.jax_sync)
    cfg = model.cfg
    L = cfg.num_layers
    lens = corpus.lengths.tolist()
    rec = {"jax": _jax_record(timing, prog.compile_s, prog.xla_mem), "torch": None}
    rec["jax"].update(calls=len(prog.chunks), samples_per_call=len(prog.chunks[0][0]), window_rows=prog.window_rows,
                      packed_rows=prog.packed_rows, group_layers=prog.group_layers)
    rec["flops"] = prog.flops
    rec["bytes"] = shapes.pass_bytes(cfg, dtype, with_head=True)
    rec["tokens"] = int(sum(lens))
    jax_last, jax_nll = np.asarray(out["last"], np.float64), np.asarray(out["nll"], np.float64)
    rec["result_summary"] = {"mean_delta_nll": float(np.nanmean(jax_nll[:, 1:] - jax_nll[:, :1]))}
    if torch_model is not None:
        import torch

        ids, mask = _torch_inputs(corpus, torch_device)
        lengths = torch.as_tensor(corpus.lengths, dtype=torch.long, device=torch_device)
        edges = torch.as_tensor(corpus.edges, device=torch_device)
        layers = torch_model.model.layers

        def run():
            lasts, nlls = [], []
            with torch.no_grad():
                for k in [None] + list(range(L)):
                    handle = None if k is None else layers[k].self_attn.register_forward_pre_hook(
                        _edit_mask_hook(edges, None), with_kwargs=True)
                    try:
                        logits = torch_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                    finally:
                        if handle is not None:
                            handle.remove()
                    lasts.append(_last_rows(logits, lengths))
                    nlls.append(_torch_nll(logits, ids, lengths))
            return torch.stack(lasts, 1), torch.stack(nlls, 1)

        harness.torch_reset_peak(torch_device)
        t_timing, (t_last, t_nll) = harness.time_calls(run, repeats, harness.torch_sync(torch_device))
        rec["torch"] = _torch_record(t_timing, torch_device)
        rec["agreement"] = {"last_logits_max_abs_diff": _max_abs(jax_last, t_last.cpu().double().numpy()),
                            "nll_max_abs_diff": _max_abs(jax_nll, t_nll.cpu().double().numpy()),
                            "logit_scale": float(np.abs(jax_last).max())}
    return rec


def _steering_interventions(cfg: ModelConfig, corpus: Corpus, doses: Sequence[float], layer: int):
    """Stacked Scale interventions [1 + S, B, ...] of the marker -> target edges at `layer`: the no-op
    reference (no edge selected) first, then one point per dose."""
    from plip_jax.analysis.generation import empty_like_interventions
    from plip_jax.core import interventions as ivs

    t = corpus.tokens.shape[1]
    per_dose = []
    for f in doses:
        per_sample = [ivs.Interventions(scale=ivs.scale(t, [(int(m), int(x)) for x in tg], float(f), length=int(n),
                                                        n_layers=cfg.num_layers, n_heads=cfg.num_heads, layers=[layer]))
                      for m, tg, n in zip(corpus.markers, corpus.targets, corpus.lengths)]
        per_dose.append(ivs.stack(per_sample))
    return ivs.stack([empty_like_interventions(per_dose[0])] + per_dose)


@dataclasses.dataclass
class SteeringProgram:
    """The steering sweep's compiled call and what describes it (`steering_program`)."""

    compiled: Any
    args: tuple  # (model, tokens, lengths, iv, markers, window starts, first rows or None): compiled(*args)
    compile_s: float
    xla_mem: Optional[dict]
    layer: int
    window_rows: int  # rows per sample's attention window (the others are the baseline's)
    packed_rows: Optional[int]  # rows of all samples the matrix products cover when packed (None: the windows)
    fused_from: Optional[int]
    group_layers: int
    unroll: bool
    flops: float  # the engine's matmul work (see `steering_sweep`)

    def run(self):
        return self.compiled(*self.args)


def steering_program(model, corpus: Corpus, doses: Sequence[float] = DEFAULT_DOSES,
                     group_layers: Optional[int] = None, unroll: bool = False) -> SteeringProgram:
    """Compile the Scale dose sweep at the middle layer: the baseline, the no-op reference and S doses x B
    samples in one call of the library's shared-prefix engine (`causal.shared_sweep_jit`). group_layers as for
    `knockout_scan`; unroll: every recomputed layer inline (no scan bodies, so no stacked copy of their
    weights; all points enter at one layer, so the program grows by L - layer blocks only)."""
    from plip_jax.experiments import causal

    g_layers = _group_layers(group_layers)
    cfg = model.cfg
    layer = steering_layer(cfg)
    iv = _steering_interventions(cfg, corpus, doses, layer)
    tokens, lengths, markers = (jnp.asarray(x) for x in (corpus.tokens, corpus.lengths, corpus.markers))
    s = len(doses)
    entries = (layer,) * (s + 1)
    windows = causal.sweep_windows(iv, corpus.lengths, corpus.tokens.shape[1], corpus.markers)  # packed
    starts = jnp.asarray(windows.starts)
    firsts = None if windows.firsts is None else jnp.asarray(windows.firsts)
    fused_from = causal.fused_from_layer(model, iv)  # --attention=fused: the blocks above the steered layer
    compiled, compile_s, xla_mem = _aot(causal.shared_sweep_jit, model, tokens, lengths, iv, markers, starts, firsts,
                                        entries=entries, width=windows.width, packed_rows=windows.packed_rows,
                                        group_layers=g_layers, fused_from=fused_from, unroll=bool(unroll))
    lens = corpus.lengths.tolist()
    L = cfg.num_layers
    # the engine's work: the baseline (L blocks, all rows, NLL + last logits) + for the reference and each
    # dose, L - layer blocks over each sample's rows from its marker on (and their NLL rows)
    flops = (shapes.forward_flops(cfg, lens, logits_rows_per_sample=1) +
             shapes.recomputed_flops(cfg, windows, len(lens), (s + 1) * (L - layer), s + 1))
    return SteeringProgram(compiled, (model, tokens, lengths, iv, markers, starts, firsts), compile_s, xla_mem, layer,
                           windows.width, windows.packed_rows, fused_from, g_layers, bool(unroll), flops)


def steering_sweep(model, corpus: Corpus, repeats: int, torch_model=None, torch_device: str = "cpu",
                   dtype: str = "float32", doses: Sequence[float] = DEFAULT_DOSES,
                   group_layers: Optional[int] = None, unroll: bool = False) -> dict:
    """Time the Scale dose sweep of `steering_program` (one compiled call) against one transformers forward
    per dose."""
    prog = steering_program(model, corpus, doses, group_layers, unroll)
    timing, out = harness.time_calls(prog.run, repeats, harness.jax_sync)
    cfg, layer, s = model.cfg, prog.layer, len(doses)
    lens = corpus.lengths.tolist()
    rec = {"jax": _jax_record(timing, prog.compile_s, prog.xla_mem), "torch": None, "doses": list(map(float, doses)),
           "layer": layer, "one_compiled_call": True, "group_layers": prog.group_layers, "unroll": prog.unroll,
           "fused_from": prog.fused_from}
    rec["jax"]["calls_per_sweep"] = 1
    rec["jax"]["window_rows"] = prog.window_rows
    rec["jax"]["packed_rows"] = prog.packed_rows
    rec["flops"] = prog.flops
    rec["bytes"] = shapes.pass_bytes(cfg, dtype, with_head=True)
    rec["tokens"] = int(sum(lens)) * s
    # the engine returns [B, 1 + S, ...] (point 0: the reference); the comparisons below use [S, B, ...]
    jax_last = np.asarray(out["last"], np.float64)[:, 1:].transpose(1, 0, 2)  # [S, B, V]
    rows = np.asarray(out["marker_rows"], np.float64)[:, 1:].transpose(1, 0, 2, 3, 4)  # [S, B, L, H, T]
    out = {"nll": np.asarray(out["nll"])[:, 1:].T}  # [S, B]
    achieved = np.stack([(rows[:, i, layer].mean(1) * corpus.counts[i]).sum(-1) for i in range(rows.shape[1])], 1)
    rec["result_summary"] = {"achieved_attention_by_dose": achieved.mean(1).tolist()}
    if torch_model is not None:
        import torch

        ids, mask = _torch_inputs(corpus, torch_device)
        lengths_t = torch.as_tensor(corpus.lengths, dtype=torch.long, device=torch_device)
        edges = torch.as_tensor(corpus.edges, device=torch_device)
        markers_t = torch.as_tensor(corpus.markers, dtype=torch.long, device=torch_device)
        attn = torch_model.model.layers[layer].self_attn

        def run():
            lasts, nlls, rows_ = [], [], []
            with torch.no_grad():
                for f in doses:
                    add = None if f == 0 else math.log(f)
                    handle = attn.register_forward_pre_hook(_edit_mask_hook(edges, add), with_kwargs=True)
                    try:
                        o = torch_model(input_ids=ids, attention_mask=mask, use_cache=False, output_attentions=True)
                    finally:
                        handle.remove()
                    lasts.append(_last_rows(o.logits, lengths_t))
                    nlls.append(_torch_nll(o.logits, ids, lengths_t))
                    att = torch.stack(o.attentions, 1)
                    rows_.append(att[torch.arange(att.shape[0], device=att.device), :, :, markers_t])
            return torch.stack(lasts), torch.stack(nlls), torch.stack(rows_)

        harness.torch_reset_peak(torch_device)
        t_timing, (t_last, t_nll, t_rows) = harness.time_calls(run, repeats, harness.torch_sync(torch_device))
        rec["torch"] = _torch_record(t_timing, torch_device)
        rec["torch"]["calls_per_sweep"] = s
        rec["agreement"] = {"last_logits_max_abs_diff": _max_abs(jax_last, t_last.cpu().double().numpy()),
                            "nll_max_abs_diff": _max_abs(np.asarray(out["nll"]), t_nll.cpu().double().numpy()),
                            "marker_rows_max_abs_diff": _max_abs(rows, t_rows.cpu().double().numpy()),
                            "logit_scale": float(np.abs(jax_last).max())}
    return rec


def make_prompts(cfg: ModelConfig, n: int, max_len: int, seed: int = 1) -> list:
    """n random prompts (token id lists) of lengths uniform in max_len // 2 .. max_len."""
    rng = np.random.RandomState(seed)
    lens = rng.randint(max(max_len // 2, 1), max_len + 1, size=n)
    return [rng.randint(3, cfg.vocab_size, size=int(k)).tolist() for k in lens]


def generation(model, prompts: list, new_tokens: int, repeats: int, torch_model=None,
               torch_device: str = "cpu", dtype: str = "float32") -> dict:
    """Time greedy batched generation of `new_tokens` tokens per prompt (no stop token)."""
    from plip_jax.analysis import generation as gen

    cfg = model.cfg

    def run_jax():
        return gen.generate(model, prompts, max_new_tokens=new_tokens, stop_ids=())

    timing, out = harness.time_calls(run_jax, repeats, lambda r: r)  # generate() returns host arrays (synced)
    lens = [len(p) for p in prompts]
    n_tok = len(prompts) * new_tokens
    rec = {"jax": _jax_record(timing, None, None), "torch": None, "new_tokens": n_tok}
    rec["jax"]["tokens_per_s"] = n_tok / timing.median_s
    rec["flops"] = shapes.generation_flops(cfg, lens, new_tokens)
    rec["bytes"] = shapes.generation_bytes(cfg, lens, new_tokens, dtype)
    rec["tokens"] = int(sum(lens)) + n_tok
    if torch_model is not None:
        import torch

        width = max(lens)
        ids = np.zeros((len(prompts), width), np.int64)
        mask = np.zeros((len(prompts), width), np.int64)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
        ids_t = torch.as_tensor(ids, device=torch_device)
        mask_t = torch.as_tensor(mask, device=torch_device)

        def run_torch():
            with torch.no_grad():
                return torch_model.generate(ids_t, attention_mask=mask_t, max_new_tokens=new_tokens,
                                            min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                            pad_token_id=0)

        harness.torch_reset_peak(torch_device)
        t_timing, t_out = harness.time_calls(run_torch, repeats, harness.torch_sync(torch_device))
        rec["torch"] = _torch_record(t_timing, torch_device)
        rec["torch"]["tokens_per_s"] = n_tok / t_timing.median_s
        hf_tokens = t_out[:, width:].cpu().numpy()
        first_diff = [int(np.argmax(a != b)) if (a != b).any() else new_tokens
                      for a, b in zip(np.asarray(out.tokens), hf_tokens)]
        rec["agreement"] = {"greedy_token_agreement": float((np.asarray(out.tokens) == hf_tokens).mean()),
                            "mean_tokens_before_first_difference": float(np.mean(first_diff))}
    return rec
