"""Tables for readers: the verdict table the runner prints, Markdown tables and a record browser
for notebooks. Display only: nothing here measures or decides.
"""

from __future__ import annotations

import json


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def verdict_table(records: list[dict], results: list | None = None) -> str:
    """(notebook, benchmark, verdict, ratio, 95% CI, reason) per record, plus a line for each run
    that failed or recorded nothing. The reason is the record's `metrics.reason`; an `inconclusive`
    row without one says so rather than leaving the reader to guess."""
    def reason(r: dict) -> str:
        why = str((r.get("metrics") or {}).get("reason") or "")
        if not why and r.get("verdict") == "inconclusive":
            return "(no reason recorded)"
        return " ".join(why.split())  # one line per row

    rows = [(str(r.get("notebook") or "-"), str(r.get("benchmark")),
             "measured" if r.get("verdict") is None else str(r.get("verdict")), _fmt(r.get("ratio")),
             "-" if r.get("ci_low") is None else f"[{_fmt(r.get('ci_low'))}, {_fmt(r.get('ci_high'))}]",
             reason(r))
            for r in records]
    for res in results or []:
        if not res.ok:
            rows.append((res.name, "(notebook failed)", "error", "-", "-", " ".join(res.error.split())[:200]))
        elif not res.records:
            rows.append((res.name, "(no records)", "-", "-", "-", ""))
    head = ("notebook", "benchmark", "verdict", "ratio", "95% CI", "reason")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(tuple("-" * w for w in widths)), *map(line, rows)])


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def table_markdown(rows: list[dict], columns: list[str] | None = None) -> str:
    """A Markdown table of `rows` (dicts), columns in first-seen order unless given."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def show_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """Display rows as a table in the notebook (Markdown; plain text elsewhere)."""
    from IPython.display import Markdown, display

    display(Markdown(table_markdown(rows, columns) if rows else "_(no rows)_"))


def browse(records: list[dict], label=lambda r: f"{r.get('benchmark')} {r.get('verdict')}",
           fields: tuple[str, ...] = ("benchmark", "verdict", "ratio", "ci_low", "ci_high", "device_name",
                                      "params", "metrics")) -> None:
    """An ipywidgets browser over already-recorded results: a dropdown and the chosen record's
    fields. The callback only formats a stored record; it never measures. Shown once headless."""
    import ipywidgets as widgets
    from IPython.display import display

    if not records:
        print("no records to browse")
        return
    pick = widgets.Dropdown(options=[(label(r), i) for i, r in enumerate(records)], description="record")
    out = widgets.Output()

    def render(change=None):
        rec = records[pick.value]
        out.clear_output()
        with out:
            display({"text/markdown": table_markdown([{"field": f, "value": json.dumps(rec.get(f), default=str)[:200]}
                                                      for f in fields])}, raw=True)

    pick.observe(render, names="value")
    render()  # headless runs call it once
    display(widgets.VBox([pick, out]))
