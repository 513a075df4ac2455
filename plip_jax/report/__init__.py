"""Static HTML report of an output folder: `write_report(output_dir, model=None, samples="default")`.

Modules: extractors (result JSON -> Section), model (Section/Cell page model), fmt (number formats),
attention_data (AttentionSample dataclass, the one model call, encoding), edges (knocked/steered edges
from the runs), html + assets (rendering, inline CSS/JS), writer (write_report).
"""

from plip_jax.report.attention_data import AttentionSample, MarkedEdge, decode, encode
from plip_jax.report.writer import write_report

__all__ = ["AttentionSample", "MarkedEdge", "decode", "encode", "write_report"]
