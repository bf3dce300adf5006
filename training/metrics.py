"""A run's evaluation records as metrics.jsonl, metrics.csv and loss.png, each rewritten atomically."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

NATS_PER_BIT = math.log(2.0)


def bits(nats: float) -> float:
    """nats/char -> bits/char."""
    return nats / NATS_PER_BIT


def _replace(path: Path, data: bytes) -> None:
    # Whole-file rewrite through a temp file: after a kill the files match the last checkpoint, never half.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_metrics(run_dir: Path, records: list[dict]) -> None:
    """records: one dict per evaluation, same keys in each (the first record's keys are the CSV columns)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    _replace(run_dir / "metrics.jsonl", lines.encode("utf-8"))
    buf = io.StringIO()
    if records:
        writer = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
    _replace(run_dir / "metrics.csv", buf.getvalue().encode("utf-8"))


def plot_losses(path: Path, records: list[dict], x: str, series: dict[str, str], title: str) -> None:
    """A loss-curve PNG: `series` maps record keys to legend labels, plotted against record key `x`."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers or in CI
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        for key, label in series.items():
            pts = [(r[x], r[key]) for r in records if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="." if len(pts) < 50 else None, label=label)
        ax.set_xlabel(x)
        ax.set_ylabel("loss (nats/char)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    _replace(path, buf.getvalue())
