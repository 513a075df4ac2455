"""Batched generation with interventions for any `Model` (transformer KV cache or RWKV-6 state).

One jitted call runs the whole generation of a batch of prompts:

* prefill: the right-padded prompts [B, T] go through the model (vmapped) with an empty per-sequence
  cache from `model.init_cache(S)` (transformer: keys/values [L, S, KV, hd], written in place; RWKV-6:
  the recurrent state, frozen after each prompt's last real token); each sequence's first-token logits
  are read at its own last real position (no left padding needed);
* decode: a `jax.lax.while_loop` over steps; every step feeds each sequence's previous token at its own
  absolute position `prompt_length + step - 1` (vmapped, one token per sequence), samples the next
  token and appends it. Sequences that sampled a stop token freeze (the stop token is not part of the
  output); the loop exits early when every sequence has stopped.

Interventions are the forward's `Interventions` pytree over ABSOLUTE positions (edges [S, S], RWKV state
edits [L, S]): the same edits act in the prefill and in every decode step, so cached generation equals
full recomputation under an intervention (tested). `steer_generated_rows` builds the "every generated row -> given prompt
columns" edge sets of the steering experiment, refusing future edges.

Sampling: greedy = argmax over float32 logits; ties resolve to the FIRST maximal index (`jnp.argmax`).
PLIP-rs resolved ties to the last one (Rust `max_by`); with float32 logits of a real model exact ties
are rare, and "first" is what HF `generate` and numpy do. Temperature / top-p sampling draws with an
explicit PRNG key: sequence b at step i uses `fold_in(fold_in(key, sample_ids[b]), i)`, so the same key
gives the same tokens, independently of batch composition (PLIP-rs used an unseeded thread RNG).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from plip_jax.core import interventions as ivs
from plip_jax.core.capture import Capture
from plip_jax.core.errors import GenerationError
from plip_jax.data.batching import bucket_length, pad_batch


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy (argmax, first max on ties); > 0 = softmax(logits / temperature), restricted
    to the smallest set of most likely tokens whose probability reaches `top_p` (1.0 = no restriction)."""

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass
class GenerationResult:
    """Generated tokens of a batch. tokens int32 [B, max_new_tokens] (entries past `n_generated` are
    `pad_id`); n_generated int32 [B]; stopped bool [B] (ended by a stop token, not by the length limit);
    prompt_lengths int32 [B]; cache_size S (positions of the KV cache and of intervention edges)."""

    tokens: np.ndarray
    n_generated: np.ndarray
    stopped: np.ndarray
    prompt_lengths: np.ndarray
    cache_size: int

    def sequences(self) -> list[list[int]]:
        """Generated token ids of each sequence (stop token excluded)."""
        return [self.tokens[b, : int(n)].tolist() for b, n in enumerate(self.n_generated)]


# --------------------------------------------------------------------------- sizes, stop tokens, prompts


def cache_size_for(prompt_lengths: Sequence[int], max_new_tokens: int, cfg: Any, multiple: int = 16,
                   ids: Optional[Sequence[str]] = None) -> int:
    """KV-cache size S (positions) for prompts of these lengths and `max_new_tokens` new tokens.

    Raises GenerationError when some prompt + max_new_tokens exceeds the model's context
    (`max_position_embeddings`), naming the prompt. S is rounded up to `multiple` (fewer compilations)
    but kept within the context when possible; it is at least the padded prompt width.
    """
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    lengths = [int(n) for n in prompt_lengths]
    if not lengths or min(lengths) < 1:
        raise GenerationError("every prompt needs at least one token")
    ctx = cfg.max_position_embeddings
    over = [(ids[i] if ids else f"prompt {i}", n) for i, n in enumerate(lengths) if n + max_new_tokens > ctx]
    if over:
        listed = ", ".join(f"{name} ({n} tokens)" for name, n in over[:5])
        raise GenerationError(
            f"prompt + max_new_tokens exceeds the model's context of {ctx} positions for {listed} with "
            f"max_new_tokens={max_new_tokens}; lower max_new_tokens (at most {ctx - max(lengths)}) or shorten the prompts"
        )
    padded = bucket_length(max(lengths), multiple)
    need = max(lengths) + max_new_tokens - 1  # the last sampled token is never fed back
    size = min(bucket_length(need, multiple), max(ctx, need))
    return max(size, padded)


def stop_token_ids(tokenizer: Any = None, model_dir: Optional[Path] = None, cfg: Any = None,
                   extra_tokens: Sequence[str] = ()) -> tuple[int, ...]:
    """Stop ids: the tokenizer's eos, config.json's eos ids, generation_config.json's `eos_token_id`
    (int or list), and any `extra_tokens` strings that are single tokens of the vocabulary."""
    ids: list[int] = []
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(int(tokenizer.eos_token_id))
    if cfg is not None:
        ids.extend(int(i) for i in getattr(cfg, "eos_token_ids", ()))
    if model_dir is not None and (Path(model_dir) / "generation_config.json").is_file():
        gen = json.loads((Path(model_dir) / "generation_config.json").read_text())
        eos = gen.get("eos_token_id")
        if eos is not None:
            ids.extend(int(i) for i in (eos if isinstance(eos, list) else [eos]))
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        ids.extend(int(vocab[t]) for t in extra_tokens if t in vocab)
    return tuple(sorted(set(ids)))


# PLIP-rs's stop-token lookup under --chat (spec section 6: `steering_generate`)
PLIP_CHAT_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "</s>", "<end_of_turn>")

# PLIP-rs's built-in templates (spec sections 1.3-1.6), used only when asked (`template="plip"`).
PLIP_CHAT_TEMPLATES = {
    "qwen2": "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
    "gemma": "<start_of_turn>user\n{system}\n{prompt}<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|system|>\n{system}<|end|>\n<|user|>\n{prompt}<|end|>\n<|assistant|>\n",
}
PLIP_DEFAULT_SYSTEM = "You are a helpful coding assistant. Write clean, correct code."


def format_prompt(tokenizer: Any, prompt: str, *, chat: bool = False, template: str = "tokenizer",
                  system: Optional[str] = None, model_type: Optional[str] = None) -> str:
    """The text to tokenize. chat=False: `prompt` as is. chat=True, template="tokenizer": the tokenizer's
    own chat template (`apply_chat_template`, system + user turns, generation prompt added);
    template="plip": PLIP-rs's hard-coded template for `model_type` (qwen2 ChatML, gemma, phi3)."""
    if not chat:
        return prompt
    sys_text = PLIP_DEFAULT_SYSTEM if system is None else system
    if template == "tokenizer":
        if not getattr(tokenizer, "chat_template", None):
            raise GenerationError(
                "--chat asks for a chat template but this tokenizer has none (base model?); run without --chat, "
                "or pass --chat_template=plip to use PLIP-rs's built-in template for the model family"
            )
        messages = ([{"role": "system", "content": sys_text}] if sys_text else []) + [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if template == "plip":
        if model_type not in PLIP_CHAT_TEMPLATES:
            raise GenerationError(f"PLIP-rs has no chat template for model_type {model_type!r} "
                                  f"(it has {sorted(PLIP_CHAT_TEMPLATES)}); run without --chat")
        return PLIP_CHAT_TEMPLATES[model_type].format(system=sys_text, prompt=prompt)
    raise GenerationError(f"template must be 'tokenizer' or 'plip', got {template!r}")


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without added special tokens (as PLIP-rs; chat templates carry their own)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Text of generated ids, special tokens skipped (as PLIP-rs)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def plip_generation_layer(cfg: Any) -> int:
    """Default steering layer: PLIP-rs's ⌊2n/3⌋ rule for non-Qwen models, used for every model here.
    (PLIP's Qwen rule, n > 30 -> 16 else 20, is inverted w.r.t. its own comment and out of range for
    models with <= 20 layers; the N=50 run passed --layer 20 explicitly.)"""
    return (2 * cfg.num_layers) // 3


# --------------------------------------------------------------------------- interventions for generation


def steer_generated_rows(cache_size: int, prompt_length: int, key_columns: Sequence[int], *, n_layers: int,
                         n_heads: int, scale: Optional[float] = None, value: Optional[float] = None,
                         layers: Optional[Sequence[int]] = None, heads: Optional[Sequence[int]] = None,
                         first_row: Optional[int] = None, context: str = "") -> ivs.Interventions:
    """Steer the attention that every generated row (positions prompt_length .. S-1) pays to the prompt
    columns `key_columns`: Scale(scale) or SetValue(value) at `layers` x `heads` (None = all).

    With `first_row` < prompt_length, prompt rows first_row .. prompt_length-1 are steered too, each only
    on the columns <= the row (never a future edge). Columns must be prompt positions (< prompt_length):
    a later column is a generated (future) position and is refused with InterventionError.
    Returns Interventions with edges bool [S, S].
    """
    where = f" ({context})" if context else ""
    if (scale is None) == (value is None):
        raise ivs.InterventionError(f"give exactly one of scale= or value={where}")
    cols = sorted({int(c) for c in key_columns})
    if not cols:
        raise ivs.InterventionError(f"no key columns to steer{where}")
    if not 0 < prompt_length <= cache_size:
        raise ivs.InterventionError(f"prompt length {prompt_length} outside the cache of {cache_size} positions{where}")
    bad = [c for c in cols if not 0 <= c < prompt_length]
    if bad:
        raise ivs.InterventionError(
            f"key column(s) {bad}{where} are not prompt positions (prompt has {prompt_length} tokens): generated "
            f"positions lie in the future of the rows that would attend to them; steer prompt columns only"
        )
    start = prompt_length if first_row is None else int(first_row)
    if not 0 <= start <= prompt_length:
        raise ivs.InterventionError(f"first_row {start} must lie within the prompt (0..{prompt_length}){where}")
    rows = np.arange(cache_size)[:, None]
    col_mask = np.zeros((cache_size,), bool)
    col_mask[cols] = True
    edges = (rows >= start) & col_mask[None, :] & (np.arange(cache_size)[None, :] <= rows)
    layer_m = jnp.asarray(ivs.layer_mask(n_layers, layers))
    head_m = jnp.asarray(ivs.head_mask(n_heads, heads))
    if scale is not None:
        if not scale >= 0:
            raise ivs.InterventionError(f"scale factor must be >= 0, got {scale}{where}")
        return ivs.Interventions(scale=ivs.AttentionScale(edges=jnp.asarray(edges), layers=layer_m, heads=head_m,
                                                          factor=jnp.float32(scale)))
    if not 0.0 <= value <= 1.0:
        raise ivs.InterventionError(f"SetValue needs 0 <= value <= 1, got {value}{where}")
    per_row = edges.sum(-1)
    if (per_row * value > 1.0 + 1e-6).any():
        raise ivs.InterventionError(f"SetValue({value}) on {int(per_row.max())} columns exceeds a row's mass{where}")
    return ivs.Interventions(set_value=ivs.AttentionSetValue(edges=jnp.asarray(edges), layers=layer_m,
                                                             heads=head_m, value=jnp.float32(value)))


def _fit_edges(kind, size: int):
    if kind is None:
        return None
    e = kind.edges
    n = e.shape[-1]
    if e.shape[-2] != n:
        raise GenerationError(f"intervention edges must be square [S, S], got {tuple(e.shape)}")
    if n == size:
        return kind
    pad = [(0, 0)] * (e.ndim - 2) + [(0, size - n), (0, size - n)]
    return kind.replace(edges=jnp.pad(e, pad))


def _fit_state(state: Optional[ivs.StateEdit], size: int) -> Optional[ivs.StateEdit]:
    if state is None:
        return None
    n = state.scale.shape[-1]
    if n > size:
        raise GenerationError(f"state edit covers {n} positions > cache size {size}; pass cache_size={n}")
    pad = [(0, 0)] * (state.scale.ndim - 1) + [(0, size - n)]
    return state.replace(scale=jnp.pad(state.scale, pad, constant_values=1.0))


def fit_interventions(iv: Optional[ivs.Interventions], size: int) -> Optional[ivs.Interventions]:
    """Pad every edge matrix of `iv` with False to [.., size, size] (edges over absolute positions;
    rows past the matrix would otherwise be clipped to its last row) and a state edit's scale with ones
    to [.., L, size]. Residual edits must already cover `size` positions."""
    if iv is None:
        return None
    for kind in (iv.knockout, iv.scale, iv.set_value):
        if kind is not None and kind.edges.shape[-1] > size:
            raise GenerationError(f"intervention edges cover {kind.edges.shape[-1]} positions > cache size {size}; "
                                  f"pass cache_size={kind.edges.shape[-1]}")
    if iv.residual is not None and iv.residual.where.shape[-1] != size:
        raise GenerationError(f"residual edit covers {iv.residual.where.shape[-1]} positions, the cache has {size}")
    shift = iv.logit_shift
    if shift is not None:
        n = shift.shift.shape[-1]
        pad = [(0, 0)] * (shift.shift.ndim - 2) + [(0, size - n), (0, size - n)]
        shift = shift.replace(shift=jnp.pad(shift.shift, pad))
    return ivs.Interventions(knockout=_fit_edges(iv.knockout, size), scale=_fit_edges(iv.scale, size),
                             set_value=_fit_edges(iv.set_value, size), residual=iv.residual,
                             state=_fit_state(iv.state, size), logit_shift=shift)


def empty_like_interventions(iv: ivs.Interventions) -> ivs.Interventions:
    """Same structure with no edge selected (a baseline that runs the very same computation: Scale on no
    edge multiplies every probability by exactly 1)."""
    def clear(kind):
        return None if kind is None else kind.replace(edges=jnp.zeros_like(kind.edges))
    res = None if iv.residual is None else iv.residual.replace(where=jnp.zeros_like(iv.residual.where))
    state = None if iv.state is None else iv.state.replace(scale=jnp.ones_like(iv.state.scale))
    shift = None if iv.logit_shift is None else iv.logit_shift.replace(shift=jnp.zeros_like(iv.logit_shift.shift))
    return ivs.Interventions(knockout=clear(iv.knockout), scale=clear(iv.scale), set_value=clear(iv.set_value),
                             residual=res, state=state, logit_shift=shift)


# --------------------------------------------------------------------------- sampling


def sample_token(logits: jnp.ndarray, key, temperature, top_p, greedy: bool) -> jnp.ndarray:
    """One token id (int32 []) from logits [V] (f32). greedy: first argmax. Otherwise temperature + top-p."""
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits).astype(jnp.int32)
    scaled = logits / temperature
    order = jnp.sort(scaled)[::-1]
    probs = jax.nn.softmax(order)
    before = jnp.cumsum(probs) - probs  # mass of strictly more likely tokens
    keep = before < top_p
    threshold = jnp.min(jnp.where(keep, order, jnp.inf))
    masked = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    return jax.random.categorical(key, masked).astype(jnp.int32)


# --------------------------------------------------------------------------- the jitted generation


PROGRESS_EVERY = 16  # decode steps between two on_step calls (each one is a device -> host round trip)
_STEP_CALLBACKS: dict[int, Callable[[int, int], None]] = {}  # call id -> on_step of a running `generate`
_CALL_IDS = itertools.count(1)


def _report_step(call_id, step, active) -> None:
    fn = _STEP_CALLBACKS.get(int(call_id))
    if fn is not None:
        fn(int(step), int(active))


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "cache_size", "greedy", "iv_batched", "progress"))
def _generate_jit(model, tokens, lengths, stop_ids, key, sample_ids, temperature, top_p, interventions, call_id, *,
                  max_new_tokens: int, cache_size: int, greedy: bool, iv_batched: bool, progress: bool = False):
    b, t = tokens.shape
    empty = model.init_cache(cache_size)
    iv_axis = 0 if iv_batched else None

    def prefill_one(tok, n, iv):
        out = model(tok, length=n, interventions=iv, capture=Capture(logits="none", final_hidden=True),
                    positions=jnp.arange(t, dtype=jnp.int32), cache=empty)
        last = jax.lax.dynamic_index_in_dim(out.final_hidden, n - 1, 0, keepdims=False)
        return out.cache, model.logits(last)

    def decode_one(cache, tok, pos, iv):
        out = model(tok[None], interventions=iv, capture=Capture(logits="last"), positions=pos[None], cache=cache)
        return out.cache, out.logits

    seq_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(sample_ids)

    def choose(logits, step):
        ks = jax.vmap(lambda k: jax.random.fold_in(k, step))(seq_keys)
        return jax.vmap(lambda lg, k: sample_token(lg, k, temperature, top_p, greedy))(logits, ks)

    rows = jnp.arange(b)

    def non_finite(logits):  # [B, V] -> bool [B]: a NaN or +inf logit, or no finite one (no distribution)
        return (jnp.isnan(logits) | jnp.isposinf(logits)).any(-1) | jnp.isneginf(logits).all(-1)

    def record(done, n, out, tok):
        stop = jnp.isin(tok, stop_ids)
        new_done = done | stop
        write = ~new_done
        out = out.at[rows, n].set(jnp.where(write, tok, out[rows, jnp.minimum(n, max_new_tokens - 1)]), mode="drop")
        return new_done, n + write.astype(jnp.int32), out, stop

    cache, logits = jax.vmap(prefill_one, in_axes=(0, 0, iv_axis))(tokens, lengths, interventions)
    out = jnp.zeros((b, max_new_tokens), jnp.int32)
    tok = choose(logits, 0)
    bad_step = jnp.where(non_finite(logits), 0, -1).astype(jnp.int32)  # first step with non-finite logits
    done, n, out, stopped = record(jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32), out, tok)

    def cond(state):
        i, _, _, done, _, _, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, cache, last_tok, done, n, out, stopped, bad_step = state
        cache, logits = jax.vmap(decode_one, in_axes=(0, 0, 0, iv_axis))(cache, last_tok, lengths + i - 1, interventions)
        bad_step = jnp.where((bad_step < 0) & ~done & non_finite(logits), i, bad_step)
        tok = choose(logits, i)
        was_done = done
        done, n, out, stop = record(done, n, out, tok)
        stopped = stopped | (stop & ~was_done)
        last_tok = jnp.where(was_done, last_tok, tok)
        if progress:  # a host round trip every PROGRESS_EVERY steps, not every step
            jax.lax.cond((i + 1) % PROGRESS_EVERY == 0,
                         lambda: jax.debug.callback(_report_step, call_id, i + 1, jnp.sum(~done)), lambda: None)
        return i + 1, cache, last_tok, done, n, out, stopped, bad_step

    state = (jnp.int32(1), cache, tok, done, n, out, stopped, bad_step)
    _, _, _, _, n, out, stopped, bad_step = jax.lax.while_loop(cond, body, state)
    return out, n, stopped, bad_step


def check_finite_logits(bad_step: np.ndarray, ids: Optional[Sequence[str]] = None) -> None:
    """Raise GenerationError naming each sequence whose logits became non-finite (NaN or +inf, or all -inf)
    and the step (0 = the first generated token): sampling from them would return an arbitrary token
    (argmax of NaN = token 0, often a stop token), i.e. a silently wrong completion. bad_step int [B], -1 = ok."""
    bad = [(b, int(s)) for b, s in enumerate(np.asarray(bad_step)) if s >= 0]
    if not bad:
        return
    name = (lambda b: ids[b]) if ids is not None else (lambda b: f"sequence {b}")
    listed = "; ".join(f"{name(b)} at step {s}" for b, s in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
    raise GenerationError(f"non-finite logits (NaN/inf) during generation: {listed} (step 0 = the first generated "
                          f"token). The model or the intervention overflowed: lower the steering scale, or run with "
                          f"--dtype=float32")


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: SamplingParams = SamplingParams(), key: Optional[jax.Array] = None,
             sample_ids: Optional[Sequence[int]] = None, stop_ids: Sequence[int] = (),
             interventions: Optional[ivs.Interventions] = None, batched_interventions: bool = False,
             cache_size: Optional[int] = None, prompt_width: Optional[int] = None, pad_id: int = 0,
             ids: Optional[Sequence[str]] = None,
             on_step: Optional[Callable[[int, int], None]] = None) -> GenerationResult:
    """Generate up to `max_new_tokens` tokens after each prompt (token id lists of any lengths), batched,
    with any `Model` (a transformer's KV cache or RWKV-6's recurrent state carries the context).

    interventions: one `Interventions` for every sequence, or (batched_interventions=True) leaves with a
    leading batch axis B; over absolute positions, padded here to S (S = `cache_size`, default
    `cache_size_for(...)`; build edges with that S, e.g. via `steer_generated_rows`).
    key / sample_ids: PRNG key (default PRNGKey(0)) and per-sequence stream ids (default 0..B-1) for
    sampling; give two sequences the same id to make them draw the same random numbers.
    stop_ids: token ids that end a sequence (not included in its output).
    on_step: called on the host as on_step(tokens_done, sequences_still_running) every PROGRESS_EVERY decode
    steps (progress display; compiled as a `jax.debug.callback`, so None compiles no host call at all).
    ids: names of the sequences for error messages (default "sequence b").
    cache_size / prompt_width: the KV-cache size and the padded prompt width (static shapes: each new pair
    compiles once). Callers that generate prompts of different lengths one call at a time pass the values
    for all of them (`cache_size_for`, `bucket_length` of the longest) to compile once.
    Returns a GenerationResult (host numpy arrays). Non-finite logits of a running sequence raise
    GenerationError naming it and the step (`check_finite_logits`).
    """
    cfg = model.cfg
    if not len(prompts):
        raise GenerationError("no prompts to generate from")
    tokens, lengths = pad_batch(prompts, pad_id)
    size = cache_size_for(lengths, max_new_tokens, cfg, ids=ids)
    if cache_size is not None:
        if cache_size < size:
            raise GenerationError(f"cache_size={cache_size} is too small: these prompts need {size} positions")
        size = int(cache_size)
    if prompt_width is not None:
        if not tokens.shape[1] <= prompt_width <= size:
            raise GenerationError(f"prompt_width={prompt_width} must lie between the padded prompts' width "
                                  f"{tokens.shape[1]} and the cache size {size}")
        tokens = np.pad(tokens, ((0, 0), (0, int(prompt_width) - tokens.shape[1])), constant_values=pad_id)
    if tokens.max() >= cfg.vocab_size or tokens.min() < 0:
        raise GenerationError(f"token ids must lie in 0..{cfg.vocab_size - 1} (model vocabulary)")
    iv = fit_interventions(interventions, size)
    if iv is not None and batched_interventions:
        leading = {x.shape[0] for x in jax.tree_util.tree_leaves(iv)}
        if leading != {len(prompts)}:
            raise GenerationError(f"batched interventions need a leading axis of {len(prompts)} (one per prompt), "
                                  f"got {sorted(leading)}")
    sids = np.arange(len(prompts)) if sample_ids is None else np.asarray(sample_ids)
    if sids.shape != (len(prompts),):
        raise GenerationError(f"sample_ids needs one id per prompt ({len(prompts)}), got shape {sids.shape}")
    stops = np.asarray(sorted(set(int(s) for s in stop_ids)) or [-1], np.int32)
    key = jax.random.PRNGKey(0) if key is None else key
    call_id = next(_CALL_IDS)
    if on_step is not None:
        _STEP_CALLBACKS[call_id] = on_step
    try:
        out, n, stopped, bad_step = _generate_jit(
            model, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(stops), key, jnp.asarray(sids, jnp.int32),
            jnp.float32(sampling.temperature if not sampling.greedy else 1.0), jnp.float32(sampling.top_p), iv,
            jnp.int32(call_id), max_new_tokens=int(max_new_tokens), cache_size=size, greedy=sampling.greedy,
            iv_batched=bool(batched_interventions and iv is not None), progress=on_step is not None)
        out, n, stopped, bad_step = jax.block_until_ready((out, n, stopped, bad_step))
    finally:
        _STEP_CALLBACKS.pop(call_id, None)
    check_finite_logits(np.asarray(bad_step), ids)
    out, n, stopped = np.array(out), np.array(n), np.array(stopped)
    for b in range(out.shape[0]):
        out[b, n[b]:] = pad_id
    return GenerationResult(tokens=out, n_generated=n, stopped=stopped, prompt_lengths=lengths, cache_size=size)
