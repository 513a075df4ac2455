"""Decoding throughput: plip-jax batched KV-cache generation vs HF `transformers` `generate`, same run.

    python -m benchmarks.bench_generation                        # bundled model, CPU, batch 1 and 8
    python -m benchmarks.bench_generation --batch_sizes=1,16,64 --new_tokens=128 --device=gpu

Both sides: same safetensors weights, same dtype, greedy, no stop token (every sequence generates
exactly --new_tokens), prompts of --prompt_len random tokens (equal lengths, so HF needs no padding),
HF with eager attention and its KV cache. Times are wall-clock after a warm-up (JAX compile excluded and
reported separately); tokens/s = batch * new_tokens / seconds (prefill included on both sides).
Also reports how many greedy tokens agree between the two (sanity: same model, same weights).
Not a test; numbers depend on the machine.
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags

from plip_jax import cli

cli.define_model_flags()
flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes to time.")
flags.DEFINE_integer("prompt_len", 32, "Prompt length (random tokens).")
flags.DEFINE_integer("new_tokens", 32, "Tokens generated per sequence.")
flags.DEFINE_integer("repeats", 2, "Timed repetitions (best is reported).")
flags.DEFINE_integer("seed", 0, "Seed of the random prompts.")
FLAGS = flags.FLAGS


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv):
    del argv
    platform = cli.select_device(FLAGS.device)
    import torch
    import transformers as hf_tf

    from plip_jax.analysis import generation as gen
    from plip_jax.models.loading import load_model

    model = load_model(FLAGS.model, FLAGS.dtype)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[FLAGS.dtype]
    torch_device = "cuda" if platform == "gpu" and torch.cuda.is_available() else "cpu"
    hf = hf_tf.AutoModelForCausalLM.from_pretrained(str(model.source.path), dtype=torch_dtype,
                                                    attn_implementation="eager").to(torch_device).eval()
    print(f"Model {model.name} ({model.cfg.num_layers} layers, hidden {model.cfg.hidden_size}), dtype {FLAGS.dtype}; "
          f"JAX on {platform}, torch on {torch_device} ({torch.get_num_threads()} threads); prompt {FLAGS.prompt_len} "
          f"tokens, {FLAGS.new_tokens} new tokens, greedy, best of {FLAGS.repeats}")
    rng = np.random.RandomState(FLAGS.seed)
    rows = []
    for b in map(int, FLAGS.batch_sizes):
        prompts = rng.randint(1, model.cfg.vocab_size, size=(b, FLAGS.prompt_len))

        def run_jax():
            return gen.generate(model.params, model.cfg, prompts.tolist(), max_new_tokens=FLAGS.new_tokens,
                                rope_mode=FLAGS.rope_mode)

        t = time.perf_counter()
        run_jax()
        compile_s = time.perf_counter() - t
        jax_s, jax_out = _best(run_jax, FLAGS.repeats)
        ids = torch.as_tensor(prompts, device=torch_device)
        mask = torch.ones_like(ids)

        def run_hf():
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=FLAGS.new_tokens,
                                  min_new_tokens=FLAGS.new_tokens, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
            return out[:, FLAGS.prompt_len:].cpu().numpy()

        run_hf()  # warm-up
        hf_s, hf_out = _best(run_hf, FLAGS.repeats)
        agree = float((np.asarray(jax_out.tokens) == hf_out).mean())
        n = b * FLAGS.new_tokens
        rows.append((b, n / jax_s, n / hf_s, compile_s, agree))
    print(f"{'batch':>5s} {'jax tok/s':>10s} {'hf tok/s':>10s} {'jax/hf':>7s} {'jax compile+1st s':>18s} {'token agreement':>16s}")
    for b, j, h, c, a in rows:
        print(f"{b:5d} {j:10.1f} {h:10.1f} {j / h:7.2f} {c:18.1f} {a:16.3f}")


if __name__ == "__main__":
    app.run(main)
