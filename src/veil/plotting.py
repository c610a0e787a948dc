"""PNG figures without pyplot: a matplotlib Figure on its own Agg canvas (the global backend is left
alone, so this works in servers and worker processes), saved atomically. matplotlib is the
``plots`` extra: ``pip install 'veil[plots]'``."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from veil.files import write_atomic


def figure(width: float = 6.4, height: float = 4.2) -> Any:
    """A ``matplotlib.figure.Figure`` of ``width`` x ``height`` inches, constrained layout, Agg canvas."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plots need matplotlib: install the plots extra, pip install 'veil[plots]'") from e
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: str | Path, *, dpi: int = 110) -> Path:
    """Render ``fig`` as PNG and write it to ``path`` atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_atomic(path, buf.getvalue())
    return Path(path)
