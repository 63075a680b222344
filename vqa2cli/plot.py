"""`--plot FILE`: score over time (records' `segments`), the quality levels as horizontal bands.

matplotlib is an optional extra (`pip install 'vqa2[plot]'`), imported only here and only when a plot is
asked for; `require(path)` checks it and the file type before any video is scored. Plots are drawn on a
bare `matplotlib.figure.Figure` (no pyplot, no GUI backend, no global state).

A level's band is the stretch of scores nearest its weight in the score (`scoring.LEVEL_WEIGHTS`: high 1,
good .75, fair .5, poor .25, low 0), so bands change at .875, .625, .375 and .125.
"""

from __future__ import annotations

import os

from vqa2cli.errors import SetupError

FORMATS = (".png", ".svg", ".pdf")
# Light fills from best to worst, in the order of the level words.
BAND_COLORS = ("#d9f0d3", "#eef6d8", "#fdf5d6", "#fde2cc", "#f8d0d0")


def require(path) -> None:
    """A SetupError, before any work, if `path` cannot be plotted to (file type, matplotlib missing)."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in FORMATS:
        raise SetupError(f"{path}: --plot writes {', '.join(FORMATS)} files, not {suffix or 'files without a suffix'}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SetupError("--plot needs matplotlib, which is not installed: pip install 'vqa2[plot]'") from None


def bands(level_words, weights) -> list[tuple[str, float, float]]:
    """(level, low, high) score bands: each level owns the scores nearest its weight."""
    pairs = sorted(zip(weights, (w.strip() for w in level_words)), reverse=True)
    edges = [1.0] + [(a + b) / 2 for (a, _), (b, _) in zip(pairs, pairs[1:])] + [0.0]
    return [(level, edges[i + 1], edges[i]) for i, (_, level) in enumerate(pairs)]


def plot_timelines(records: list[dict], path, title: str | None = None) -> int:
    """Draw each record's segments as a step line over time into `path` (.png, .svg or .pdf, replaced
    atomically). Records without segments are left out; returns how many were drawn."""
    from matplotlib.figure import Figure

    from vqa2cli.config import LEVEL_WORDS
    from vqa2cli.scoring import LEVEL_WEIGHTS

    figure = Figure(figsize=(9, 3.6), layout="constrained")
    ax = figure.subplots()
    for (level, low, high), color in zip(bands(LEVEL_WORDS, LEVEL_WEIGHTS), BAND_COLORS):
        ax.axhspan(low, high, color=color, zorder=0)
        ax.text(1.005, (low + high) / 2, level, transform=ax.get_yaxis_transform(), va="center", fontsize=8)
    drawn = 0
    for record in records:
        segments = record.get("segments")
        if not segments:
            continue
        edges = [segments[0]["start"]] + [s["end"] for s in segments]
        ax.stairs([s["score"] for s in segments], edges, baseline=None, linewidth=1.8,
                  label=os.path.basename(str(record["path"])))
        drawn += 1
    ax.set(xlabel="time (s)", ylabel="score", ylim=(0, 1), title=title)
    ax.set_xlim(left=0)
    if drawn > 1:
        ax.legend(fontsize=8, loc="lower left")
    path = os.fspath(path)
    part = path + ".part"
    figure.savefig(part, format=os.path.splitext(path)[1][1:].lower())
    os.replace(part, path)
    return drawn
