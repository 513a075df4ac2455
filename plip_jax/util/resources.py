"""Where the files shipped next to the code are: the corpora (`corpus/`) and the flagfile presets and model
shapes (`configs/`).

Both folders live at the top level of the repository. A wheel (`pip install .`) ships them inside this
package as `plip_jax/_corpus/` and `plip_jax/_configs/` (pyproject.toml maps the folders to those package
paths). `shipped_dir` returns the installed copy when there is one, else the repository's folder (a source
checkout or an editable install).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # plip_jax/
SHIPPED = ("corpus", "configs")


def shipped_dir(kind: str) -> Path:
    """The folder of shipped `kind` files ("corpus" or "configs")."""
    if kind not in SHIPPED:
        raise ValueError(f"unknown shipped folder {kind!r}; one of {', '.join(SHIPPED)}")
    installed = PACKAGE_DIR / f"_{kind}"
    return installed if installed.is_dir() else PACKAGE_DIR.parent / kind
