"""The `plots:` of dvc.yaml rendered as PNG files, so MLflow holds the same views as `dvc plots show`.

dvc.yaml stays the one definition: each top-level plot names x, and y columns per CSV file. A plot
whose file or columns are missing (e.g. GAIN-RL's mu when another ordering ran) is skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml


@dataclass(frozen=True)
class PlotSpec:
    title: str
    x: str
    file: str
    ys: tuple[str, ...]


def plot_specs(dvc_file: Path = Path("dvc.yaml")) -> list[PlotSpec]:
    specs = []
    for entry in yaml.safe_load(dvc_file.read_text()).get("plots") or []:
        if not isinstance(entry, dict):
            continue
        for title, props in entry.items():
            for file, ys in (props.get("y") or {}).items():
                ys = [ys] if isinstance(ys, str) else list(ys)
                specs.append(PlotSpec(title=title, x=props.get("x", "step"), file=file, ys=tuple(ys)))
    return specs


def file_name(spec: PlotSpec) -> str:
    return re.sub(r"[^a-z0-9]+", "_", spec.title.lower()).strip("_") + ".png"


def render(spec: PlotSpec, out_dir: Path) -> Path | None:
    """Draw one plot to out_dir/<title>.png; None when its data is not there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(spec.file)
    if not path.is_file():
        return None
    frame = pd.read_csv(path)
    ys = [y for y in spec.ys if y in frame.columns]
    if spec.x not in frame.columns or not ys:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for y in ys:
        data = frame[[spec.x, y]].dropna()
        ax.plot(data[spec.x], data[y], marker="o" if len(data) <= 20 else None, label=y)
    ax.set_xlabel(spec.x)
    ax.set_title(spec.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = out_dir / file_name(spec)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def render_for(outputs: list[str], out_dir: Path, dvc_file: Path = Path("dvc.yaml")) -> list[Path]:
    """PNG files for the plots whose data file is one of `outputs` (or inside one of them)."""
    written = []
    for spec in plot_specs(dvc_file):
        if any(spec.file == o or spec.file.startswith(o.rstrip("/") + "/") for o in outputs):
            png = render(spec, out_dir)
            if png is not None:
                written.append(png)
    return written
