"""Corpora and samples: loading and validating corpus files (`corpus`), character -> token positions
(`positions`), the legacy corpus conversion (`conversion`) and right-padded batches (`batching`).
Independent of any model (tokenizers are passed in). Also holds the bundled RWKV World vocabulary."""
