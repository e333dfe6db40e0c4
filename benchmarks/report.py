"""Render benchmark results: Markdown table, RST list-table (for the docs) and a PNG plot.

A result row is a :class:`Row`: samples of datalad-udocker and of the yardstick measured in
the same run, and the issue's target for their relation (a ratio, a difference in seconds,
or a ceiling in MiB).  Nothing here asserts: "holds" is reported, never enforced.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class Row:
    key: str
    operation: str
    ours: List[float]                  # seconds (or MiB for kind "rss")
    yardstick: str
    yard: List[float]
    kind: str = "ratio"                # "ratio": ours/yard, "delta": ours-yard s, "rss": MiB
    target: Optional[float] = None     # ratio <=, seconds <=, MiB <
    also: List[tuple] = field(default_factory=list)   # (label, samples): more yardsticks

    @property
    def value(self):
        if self.kind == "ratio":
            return med(self.ours) / med(self.yard)
        if self.kind == "delta":
            return med(self.ours) - med(self.yard)
        return max(self.ours)

    @property
    def holds(self):
        if self.target is None:
            return None
        return self.value < self.target if self.kind == "rss" else self.value <= self.target

    def value_text(self):
        if self.kind == "ratio":
            text = f"{self.value:.2f}x"
        elif self.kind == "delta":
            text = f"{self.value:+.2f} s"
        else:
            return f"{self.value:.0f} MiB ({self.value / max(self.yard):.1f}x)"
        for label, samples in self.also:
            text += f" ({med(self.ours) / med(samples):.2f}x {label})"
        return text

    def target_text(self):
        if self.target is None:
            return "-"
        return {"ratio": f"<= {self.target:.1f}x", "delta": f"<= +{self.target:.2f} s",
                "rss": f"< {self.target:g} MiB"}[self.kind]

    def holds_text(self):
        return {None: "-", True: "yes", False: "**no**"}[self.holds]


def med(samples):
    return statistics.median(samples)


def spread(samples, unit="s"):
    """``median (min-max)``: seconds with 2 decimals, MiB as integers."""
    if unit == "MiB":
        if len(samples) == 1:
            return f"{samples[0]:.0f} MiB"
        return f"{max(samples):.0f} MiB (max; {min(samples):.0f}-{max(samples):.0f})"
    fmt = "{:.3f}" if med(samples) < 0.1 else "{:.2f}"
    text = fmt.format(med(samples)) + " s"
    if len(samples) > 1:
        text += f" ({fmt.format(min(samples))}-{fmt.format(max(samples))})"
    return text


HEADER = ["operation", "datalad-udocker: median (min-max)", "yardstick, same run",
          "ratio", "target", "holds"]


def cells(row: Row):
    unit = "MiB" if row.kind == "rss" else "s"
    yard = f"{row.yardstick}: {spread(row.yard, unit)}"
    for label, samples in row.also:
        yard += f"; {label}: {spread(samples, unit)}"
    return [row.operation, spread(row.ours, unit), yard, row.value_text(), row.target_text(),
            row.holds_text()]


def markdown(rows: List[Row], preamble: str) -> str:
    lines = [preamble, "", "| " + " | ".join(HEADER) + " |",
             "| " + " | ".join("---" for _ in HEADER) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells(row)) + " |")
    return "\n".join(lines) + "\n"


def rst_list_table(rows: List[Row], preamble: str) -> str:
    """A ``list-table`` directive for ``.. include::`` in the docs."""
    def cell(text):
        return text.replace("**", "").replace("`", "``").replace("````", "``") or "-"
    out = [preamble, "", ".. list-table::", "   :header-rows: 1", "   :widths: 30 18 30 12 8 6",
           ""]
    for r in [HEADER] + [cells(row) for row in rows]:
        out.append("   * - " + cell(r[0]))
        out.extend("     - " + cell(c) for c in r[1:])
    return "\n".join(out) + "\n"


def plot(rows: List[Row], path, title: str) -> None:
    """Left: seconds of ours vs the yardstick (median, min-max bars, log scale).
    Right: each row's measured relation as a share of its target (1 = the target)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.kind != "rss"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.55 * len(rows) + 2.2),
                                   gridspec_kw={"width_ratios": [3, 2]})
    y = list(range(len(timed)))
    for offset, name, color, get in ((-0.2, "datalad-udocker", "tab:blue", lambda r: r.ours),
                                     (0.2, "yardstick", "tab:gray", lambda r: r.yard)):
        vals = [get(r) for r in timed]
        m = [med(v) for v in vals]
        err = [[mm - min(v) for mm, v in zip(m, vals)], [max(v) - mm for mm, v in zip(m, vals)]]
        ax1.barh([i + offset for i in y], m, height=0.38, xerr=err, color=color, label=name,
                 capsize=2)
    ax1.set_yticks(y)
    ax1.set_yticklabels([r.key for r in timed])
    ax1.invert_yaxis()
    ax1.set_xscale("log")
    ax1.set_xlabel("seconds (median, min-max), log scale")
    ax1.legend(loc="lower right", fontsize=8)
    targeted = [r for r in rows if r.target is not None]
    shares = [(r.value if r.kind != "delta" else max(r.value, 0.0)) / r.target for r in targeted]
    ax2.scatter(shares, range(len(targeted)), s=60, zorder=3,
                color=["tab:green" if r.holds else "tab:red" for r in targeted])
    ax2.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax2.set_xscale("log")
    ax2.set_xlim(min(shares + [0.5]) / 2, max(shares + [2.0]) * 10)
    ax2.set_ylim(len(targeted) - 0.5, -0.5)
    ax2.set_yticks(range(len(targeted)))
    ax2.set_yticklabels([r.key for r in targeted])
    ax2.grid(axis="x", which="major", alpha=0.3)
    ax2.set_xlabel("measured / target, log scale (left of the dashed line: holds)")
    for i, (r, s) in enumerate(zip(targeted, shares)):
        ax2.annotate(r.value_text().split(" (")[0] + "  vs " + r.target_text(), (s, i),
                     xytext=(7, 0), textcoords="offset points", va="center", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
