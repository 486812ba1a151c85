"""The `plots:` of dvc.yaml rendered as PNG files, so MLflow holds the same views as `dvc plots show`.

dvc.yaml stays the one definition: each top-level plot names x (and optionally x_label, y_label), and
y columns per CSV file; a plot over several files draws them on one axes. Files or columns that are
missing (e.g. GAIN-RL's mu when another ordering ran) are left out, and a plot with none is skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml


@dataclass(frozen=True)
class PlotSpec:
    """One top-level plot of dvc.yaml: its x column, and the y columns it draws from each file."""

    title: str
    x: str
    series: tuple[tuple[str, tuple[str, ...]], ...]  # (file, y columns) in dvc.yaml's order
    x_label: str | None = None
    y_label: str | None = None

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(file for file, _ in self.series)


def plot_specs(dvc_file: Path = Path("dvc.yaml")) -> list[PlotSpec]:
    specs = []
    for entry in yaml.safe_load(dvc_file.read_text()).get("plots") or []:
        if not isinstance(entry, dict):
            continue
        for title, props in entry.items():
            series = tuple((file, tuple([ys] if isinstance(ys, str) else ys))
                           for file, ys in (props.get("y") or {}).items())
            specs.append(PlotSpec(title=title, x=props.get("x", "step"), series=series,
                                  x_label=props.get("x_label"), y_label=props.get("y_label")))
    return specs


def file_name(spec: PlotSpec) -> str:
    return re.sub(r"[^a-z0-9]+", "_", spec.title.lower()).strip("_") + ".png"


def render(spec: PlotSpec, out_dir: Path) -> Path | None:
    """Draw one plot, every file's columns on one axes, to out_dir/<title>.png; None when none of its
    data is there. Lines are labelled by column, and by file too when the plot reads several files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = []
    for file, ys in spec.series:
        path = Path(file)
        if not path.is_file():
            continue
        frame = pd.read_csv(path)
        if spec.x not in frame.columns:
            continue
        for y in (y for y in ys if y in frame.columns):
            data = frame[[spec.x, y]].dropna()
            label = f"{Path(file).stem}: {y}" if len(spec.series) > 1 else y
            lines.append((data, y, label))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for data, y, label in lines:
        ax.plot(data[spec.x], data[y], marker="o" if len(data) <= 20 else None, label=label)
    ax.set_xlabel(spec.x_label or spec.x)
    if spec.y_label:
        ax.set_ylabel(spec.y_label)
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
        if any(file == o or file.startswith(o.rstrip("/") + "/") for file in spec.files for o in outputs):
            png = render(spec, out_dir)
            if png is not None:
                written.append(png)
    return written
