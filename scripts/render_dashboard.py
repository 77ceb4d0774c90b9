"""Render every panel of deploy/grafana/inspectd-dashboard.json from a live Prometheus, with matplotlib.

Each panel's PromQL is taken from the dashboard as shipped, its Grafana variables filled in
(``$instance`` and ``$product`` = all, ``$__rate_interval`` and ``$__range`` given), and evaluated
through Prometheus' HTTP API: ``/api/v1/query_range`` for the time series drawn, ``/api/v1/query``
for the stat panels' numbers. tests/test_dashboard_live.py uses the same functions to check that
every panel returns data; it writes the picture docs/dashboard-panels.png.

    python scripts/render_dashboard.py --prometheus http://127.0.0.1:9090 --start 1796284800 \
        --end 1796284900 --out docs/dashboard-panels.png
"""

from __future__ import annotations

import argparse
import json
import math
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "inspectd-dashboard.json"


@dataclass
class Target:
    """One query of one panel, with the dashboard's variables filled in."""

    panel: str
    kind: str
    expr: str
    legend: str
    instant: list[dict[str, Any]] = field(default_factory=list)
    series: list[dict[str, Any]] = field(default_factory=list)


def fill(expr: str, rate_interval: str, range_: str) -> str:
    """The dashboard's Grafana variables → concrete PromQL (all instances, all products)."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$__range", range_)
        .replace("$instance", ".*")
        .replace("$product", ".*")
    )


def dashboard_targets(path: Path = DASHBOARD) -> list[Target]:
    """Every panel target of the dashboard, unfilled (``fill`` is applied per query)."""
    board = json.loads(path.read_text())
    out = []
    for panel in board["panels"]:
        for t in panel.get("targets", []):
            out.append(Target(panel["title"], panel["type"], t["expr"], t.get("legendFormat", "")))
    return out


def api(base: str, endpoint: str, **params: Any) -> list[dict[str, Any]]:
    """One Prometheus HTTP API call; the ``data.result`` list (raises on an error status)."""
    url = f"{base}/api/v1/{endpoint}?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    if body.get("status") != "success":
        raise ValueError(f"{params.get('query')}: {body}")
    return body["data"]["result"]


def finite_values(result: list[dict[str, Any]]) -> list[float]:
    """The finite numbers in an instant or range query result."""
    vals = []
    for s in result:
        points = s["values"] if "values" in s else [s["value"]]
        vals += [float(v) for _, v in points if math.isfinite(float(v))]
    return vals


def fetch(base: str, targets: list[Target], start: float, end: float, step: float = 1.0,
          rate_interval: str = "10s") -> list[Target]:
    """Fill each target with its instant result at ``end`` (rates and ranges over the whole
    window) and its range result over ``[start, end]`` (rates over ``rate_interval``)."""
    window = f"{max(1, math.ceil(end - start))}s"
    for t in targets:
        t.instant = api(base, "query", query=fill(t.expr, window, window), time=end)
        t.series = api(base, "query_range", query=fill(t.expr, rate_interval, window), start=start, end=end, step=step)
    return targets


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or str(labels)


def render(targets: list[Target], out: Path, start: float, title: str = "inspectd dashboard, live data") -> Path:
    """One grid image: a number per stat panel, the lines of every time-series panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, list[Target]] = {}
    for t in targets:
        panels.setdefault(t.panel, []).append(t)
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, ts) in zip(axes.flat, panels.items(), strict=False):
        ax.set_title(name, fontsize=10, loc="left")
        if ts[0].kind == "stat":
            lines = []
            for t in ts:
                for s in t.instant:
                    v = float(s["value"][1])
                    lines.append(f"{v:.3g}" if not t.legend.startswith("{{") else legend(t.legend, s["metric"]))
            ax.text(0.5, 0.5, "\n".join(lines) or "no data", ha="center", va="center", fontsize=22,
                    transform=ax.transAxes, color="#2a7" if lines else "#c33")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        for t in ts:
            for s in t.series:
                xs = [float(x) - start for x, _ in s["values"]]
                ys = [float(y) for _, y in s["values"]]
                ax.plot(xs, ys, lw=1.2, label=legend(t.legend, s["metric"]))
        ax.set_xlabel("s since the stream started", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper left", ncol=2)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prometheus", required=True, help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    p.add_argument("--start", type=float, required=True, help="Unix seconds")
    p.add_argument("--end", type=float, required=True, help="Unix seconds")
    p.add_argument("--step", type=float, default=1.0)
    p.add_argument("--rate-interval", default="10s")
    p.add_argument("--out", default="docs/dashboard-panels.png")
    a = p.parse_args()
    targets = fetch(a.prometheus, dashboard_targets(), a.start, a.end, a.step, a.rate_interval)
    print(render(targets, Path(a.out), a.start))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
