"""PNG charts for the benchmark scripts: each script draws its figures next to its JSON report.

    .venv/bin/python -P benchmarks/charts.py REPORT.json [...]   # redraw saved reports

Every point is a median with its [min..max] over the repeats as an error bar, so a chart shows the same
numbers as the script's markdown table. matplotlib runs on its Agg backend (no display needed).
"""

from __future__ import annotations

import statistics
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

SUBTITLE_WIDTH = 80  # characters per subtitle line at the figures' 7-inch width


def png_beside(json_path: str | Path, suffix: str = "") -> Path:
    """Where a report's chart goes: the JSON's path with .png (and `suffix` before it)."""
    path = Path(json_path)
    return path.with_name(f"{path.stem}{suffix}.png")


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of one point's repeats."""
    return statistics.median(values), min(values), max(values)


def _error_bars(points: list[tuple[float, float, float]]) -> list[list[float]]:
    return [[m - lo for m, lo, _ in points], [hi - m for m, _, hi in points]]


def line_chart(path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, dict[float, list[float]]],
               *, log_x: bool = False, log_y: bool = False, subtitle: str = "") -> Path:
    """One line per series: x → the repeats measured at x, drawn as median with a [min..max] bar."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, by_x in series.items():
        xs = sorted(by_x)
        points = [spread(by_x[x]) for x in xs]
        ax.errorbar(xs, [m for m, _, _ in points], yerr=_error_bars(points), marker="o", capsize=3, label=name)
    if log_x:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({x for by_x in series.values() for x in by_x}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    if log_y:
        ax.set_yscale("log")
    _finish(fig, ax, path, title, xlabel, ylabel, subtitle)
    return path


def bar_chart(path: Path, title: str, ylabel: str, groups: dict[str, dict[str, list[float]]], *,
              log_y: bool = False, subtitle: str = "") -> Path:
    """Grouped bars: group → bar name → the repeats, drawn as median with a [min..max] bar."""
    names = list(dict.fromkeys(bar for bars in groups.values() for bar in bars))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for i, name in enumerate(names):
        xs, points = [], []
        for g, bars in enumerate(groups.values()):
            if name in bars:
                xs.append(g + (i - (len(names) - 1) / 2) * width)
                points.append(spread(bars[name]))
        ax.bar(xs, [m for m, _, _ in points], width, yerr=_error_bars(points), capsize=3, label=name)
    ax.set_xticks(range(len(groups)), list(groups))
    if log_y:
        ax.set_yscale("log")
    _finish(fig, ax, path, title, "", ylabel, subtitle)
    return path


def _finish(fig, ax, path: Path, title: str, xlabel: str, ylabel: str, subtitle: str) -> None:
    subtitle = textwrap.fill(subtitle, SUBTITLE_WIDTH)  # a long machine line would run off the figure
    ax.set_title(f"{title}\n{subtitle}" if subtitle else title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    """Redraw the charts of saved reports: each names the script that wrote it ("script"), whose `draw` runs."""
    import argparse
    import importlib
    import json
    import sys

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("reports", nargs="+", help="JSON reports written by the benchmark scripts' --json")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts, also under -P
    for name in args.reports:
        report = json.loads(Path(name).read_text())
        script = report.get("script")
        if not script:
            p.error(f"{name}: no 'script' field (written before the charts existed?)")
        for png in importlib.import_module(script).draw(report, name):
            print(png)


if __name__ == "__main__":
    main()
