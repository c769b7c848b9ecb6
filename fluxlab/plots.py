"""Figures a reader understands at notebook width: a title, labelled axes with units, plain tick
numbers (no "+1.763e2" offset), tick labels of at least MIN_FONT_PT points.

`plain_numbers(ax)` turns matplotlib's offset and scientific notation off on linear axes;
`figure_problems(fig)` lists what breaks those rules (tests and notebooks assert it is empty).
"""

from __future__ import annotations

MIN_FONT_PT = 7.0


def plain_numbers(ax) -> None:
    """Plain tick numbers on the linear axes of `ax` (log axes keep their own formatter)."""
    from matplotlib.ticker import ScalarFormatter

    for axis in (ax.xaxis, ax.yaxis):
        if isinstance(axis.get_major_formatter(), ScalarFormatter):
            fmt = ScalarFormatter(useOffset=False)
            fmt.set_scientific(False)
            axis.set_major_formatter(fmt)


def _is_colorbar(ax) -> bool:
    return getattr(ax, "_colorbar", None) is not None


def figure_problems(fig, min_font_pt: float = MIN_FONT_PT) -> list[str]:
    """What makes `fig` hard to read, one line per problem ([] when none).

    Every plotting axes needs a title (its own or the figure's), an x and a y label (a colorbar: its
    label), no offset text, and tick labels of at least `min_font_pt` points.
    """
    fig.canvas.draw()  # offset texts and tick labels exist only once drawn
    suptitle = fig._suptitle.get_text() if getattr(fig, "_suptitle", None) is not None else ""
    problems = []
    for i, ax in enumerate(fig.axes):
        name = f"axes {i} ({ax.get_title() or 'untitled'})"
        if _is_colorbar(ax):
            if not (ax.get_ylabel() or ax.get_xlabel()):
                problems.append(f"{name}: colorbar without a label")
        else:
            if not (ax.get_title() or suptitle):
                problems.append(f"{name}: no title")
            if not ax.get_xlabel():
                problems.append(f"{name}: no x label")
            if not ax.get_ylabel():
                problems.append(f"{name}: no y label")
        for axis_name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            offset = axis.get_offset_text().get_text()
            if offset:
                problems.append(f"{name}: {axis_name} axis uses offset notation {offset!r}")
            small = {t.get_fontsize() for t in axis.get_ticklabels() if t.get_text() and t.get_visible()
                     and t.get_fontsize() < min_font_pt}
            if small:
                problems.append(f"{name}: {axis_name} tick labels at {min(small):g} pt (< {min_font_pt:g} pt)")
    return problems
