"""Grouped bar charts shared by the op benchmarks: one panel per (mode, metric), one bar
group per case, one bar per peer."""
from __future__ import annotations


def bar_panels(path: str, results: list[dict], case_key: str, cases: list[str], peers: list[str],
               panels: list[tuple[str, str, str]], grid: tuple[int, int] | None = None) -> bool:
    """Write the chart to `path`; False (nothing written) when matplotlib is missing.

    results: dicts with `case_key`, 'peer', 'mode' and the metrics named in `panels`
    ((mode, metric, title) each); a missing value draws as 0.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows, cols = grid or (1, len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(max(10, 1.5 * len(cases) * cols), 4.5 * rows), squeeze=False)
    width = 0.8 / max(1, len(peers))
    for ax, (mode, key, title) in zip(axes.flat, panels):
        for i, peer in enumerate(peers):
            vals = []
            for case in cases:
                hit = [r.get(key) for r in results if r[case_key] == case and r["peer"] == peer and r["mode"] == mode]
                vals.append(hit[0] if hit and hit[0] is not None else 0.0)
            ax.bar([j + i * width for j in range(len(cases))], vals, width, label=peer)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
