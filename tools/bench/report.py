"""The bench's results as Markdown: one page per scorer × backend, one summary table over a folder."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tools.bench.daemon_path import HOPS, PATH_HOPS
from tools.bench.stages import SIZES, STAGE_OF, STAGES


def _ms(v: float | None) -> str:
    """A stage time for a table cell; "–" where the scorer has no such stage."""
    return "–" if v is None else f"{v:.1f}"


def transport_line(r: dict[str, Any]) -> list[str]:
    """How the bench's sensor reached the daemon, where the result says (older results do not)."""
    used = sorted({e["daemon"]["zmq_transport"] for e in r["sizes"].values() if "zmq_transport" in e.get("daemon", {})})
    if not used:
        return []
    how = {"ipc": "Unix sockets (ipc://), as a sensor adapter on the daemon's machine connects",
           "tcp": "loopback TCP, as a sensor on another machine connects, less the network"}
    lines = [f"ZeroMQ transport, sensor → daemon → subscriber: {'; '.join(how[t] for t in used)}."]
    handed = sorted({e["daemon"]["handover"] for e in r["sizes"].values() if "handover" in e.get("daemon", {})})
    ways = {"shared_memory": "a slot in shared memory and a request over a Unix socket (workers.handover)",
            "object_store": "a Ray call, the frames in Ray's object store (workers.handover: object_store)"}
    if handed:
        counts = [f"{size} {int(n.get('shared_memory', 0))} of {int(sum(n.values()))}"
                  for size, e in r["sizes"].items() if (n := e.get("daemon", {}).get("handover_calls_paced"))]
        through = f" Calls of the paced run through shared memory: {', '.join(counts)}." if counts else ""
        lines.append(f"Frames reach the actors by: {'; '.join(ways[h] for h in handed)}.{through}")
    return lines


def render_markdown(r: dict[str, Any]) -> str:
    """The result as a Markdown page: summary table, stage tables, notes and conditions."""
    m = r["machine"]
    lines = [
        f"# inspectd bench: {r['scorer']} on {r['backend']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}; "
        f"Python {m['python']}, torch {m['torch']}.",
        f"Command: `{r['command']}`",
        *transport_line(r),
        "",
        "| frame | points | in-process p50 / p99 ms | daemon p50 / p99 ms (offered rate) | saturated throughput /s "
        "| overhead (daemon / in-process p50) | peak RSS MiB in-process / daemon+workers | load avg (1 min) start → end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size, e in r["sizes"].items():
        ip, d = e["in_process"], e.get("daemon")
        load = f"{e['load_average_start'][0]} → {e['load_average_end'][0]}" if "load_average_start" in e else "-"
        if d:
            lines.append(
                f"| {size} | {e['points_per_frame']:,} | {ip['latency_ms_p50']:.0f} / {ip['latency_ms_p99']:.0f} | "
                f"{d['latency_ms_p50']:.0f} / {d['latency_ms_p99']:.0f} ({d['offered_rate_per_s']:.2f}/s) | "
                f"{d['throughput_per_s_saturated']:.2f} | {e['overhead_ratio_p50']:.2f} | "
                f"{ip['peak_rss_mib']:.0f} / {d['peak_rss_mib_daemon_and_workers']:.0f} | {load} |")
        else:
            lines.append(
                f"| {size} | {e['points_per_frame']:,} | {ip['latency_ms_p50']:.0f} / {ip['latency_ms_p99']:.0f} | "
                f"- | - | - | {ip['peak_rss_mib']:.0f} / - | {load} |")
    for title, part in (("In-process", "in_process"), ("Daemon path (the daemon's own measurement, paced run)", "daemon")):
        rows = [(size, e[part]["stages_ms_mean"]) for size, e in r["sizes"].items() if part in e
                and "stages_ms_mean" in e[part]]
        if not rows:
            continue
        extra = ["transport"] if part == "daemon" else []
        lines += ["", f"{title} stages, mean ms (– : the scorer has no such stage):", "",
                  "| frame | " + " | ".join([*STAGES, *extra]) + " |", "|---|" + "---|" * (len(STAGES) + len(extra))]
        for size, st in rows:
            lines.append(f"| {size} | " + " | ".join(_ms(st.get(k)) for k in (*STAGES, *extra)) + " |")
    rounds = [f"{size} {e['in_process']['rounds_p50_ms'][0]:.0f} / {e['in_process']['rounds_p50_ms'][1]:.0f}"
              for size, e in r["sizes"].items() if "rounds_p50_ms" in e["in_process"]]
    if rounds:
        lines += ["", "In-process p50 over two rounds, before and after the daemon's run (each round's p50 ms: "
                  + ", ".join(rounds) + ")."]
    counts = [f"{size}: {a['sent']} sent, {a['received']} received, {a['not_published']} logged but not "
              f"published, {a['unanswered']} unanswered"
              for size, e in r["sizes"].items() if (a := e.get("daemon", {}).get("accounting"))]
    if counts:
        lines += ["", "Every frame of the daemon's two streams (unpaced and paced), by where it ended (a verdict "
                  "received by the subscriber; logged by the daemon but dropped by its PUB socket for a slow "
                  "subscriber; not even logged): " + "; ".join(counts) + "."]
    samplers = [f"{size} {100 * e['daemon']['rss_sampler_cpu_fraction']:.1f} %"
                for size, e in r["sizes"].items() if "rss_sampler_cpu_fraction" in e.get("daemon", {})]
    if samplers:
        lines += ["", "CPU the bench's memory sampler took during the daemon's run (share of one core): "
                  + ", ".join(samplers) + "."]
    lines += hop_table(r)
    notes = sorted({e["note"] for e in r["sizes"].values() if e.get("note")})
    lines += ["", "Stage mapping (measured key → stage): "
              + ", ".join(f"`{k}` → {v}" for k, v in r.get("stage_map", STAGE_OF).items()) + "; "
              "`transport` (daemon only, not an issue stage) = queue + put + actor wait + deserialize + return."]
    for n in notes:
        lines += ["", f"Enrollment: {n}."]
    for s in r.get("skipped", []):
        lines += ["", f"Skipped: {s['scorer']} on {s['backend']}: {s['reason']}."]
    return "\n".join(lines) + "\n"


def hop_table(r: dict[str, Any]) -> list[str]:
    """The daemon path's hops per size (``tools.bench.daemon_path``), as Markdown lines; none
    for results measured before the hops were."""
    rows = [(size, e["daemon"]) for size, e in r["sizes"].items() if "hops_ms_mean" in e.get("daemon", {})]
    if not rows:
        return []

    def ratio(d: dict[str, Any]) -> str:
        return "–" if d.get("overhead_ratio_hops") is None else f"{d['overhead_ratio_hops']:.3f}"

    cols = (*HOPS, "total")
    return ["", "Daemon path, per hop, mean ms over the paced run (they add up to the subscriber's mean latency, "
            "`total`; `other`: the daemon's time no hop accounts for; `wire`: ZeroMQ both ways; `path`: the hops "
            f"in-process scoring does not have, {', '.join(PATH_HOPS)}; overhead within the run = total / "
            "(total − path)):", "",
            "| frame | " + " | ".join(h.replace("_", " ") for h in cols) + " | path | overhead within the run |",
            "|---|" + "---|" * (len(cols) + 2),
            *(f"| {size} | " + " | ".join(_ms(d["hops_ms_mean"].get(h)) for h in cols)
              + f" | {_ms(d['hops_ms_mean'].get('path'))} | {ratio(d)} |" for size, d in rows)]


def summary_table(out: Path) -> str:
    """One Markdown table over every ``*.json`` result in ``out``: per result file (its name says
    the machine and the code measured) × size the scorer, backend, in-process p50, daemon p50 /
    p99, saturated throughput, overhead ratio, peak RSS, load."""
    lines = ["| result | scorer | backend | frame | in-process p50 ms | daemon p50 / p99 ms | saturated /s "
             "| overhead (p50 ratio) | peak RSS MiB in-process / daemon+workers | load avg (1 min) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(Path(out).glob("*.json")):
        r = json.loads(path.read_text())
        for size in [s for s in SIZES if s in r.get("sizes", {})]:
            e = r["sizes"][size]
            ip, d = e["in_process"], e.get("daemon")
            load = f"{e['load_average_start'][0]}–{e['load_average_end'][0]}" if "load_average_start" in e else "n/a"
            dcol = f"{d['latency_ms_p50']:.0f} / {d['latency_ms_p99']:.0f}" if d else "-"
            sat = f"{d['throughput_per_s_saturated']:.2f}" if d else "-"
            ratio = f"{e['overhead_ratio_p50']:.2f}" if d else "-"
            rss = f"{ip['peak_rss_mib']:.0f} / {d['peak_rss_mib_daemon_and_workers']:.0f}" if d else f"{ip['peak_rss_mib']:.0f} / -"
            lines.append(f"| {path.stem} | {r['scorer']} | {r['backend']} | {size} | {ip['latency_ms_p50']:.0f} | {dcol} | {sat} "
                         f"| {ratio} | {rss} | {load} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, name: str, report: dict[str, Any], render: Callable[[dict[str, Any]], str]) -> None:
    """Write a bench result as ``<out>/<name>.json`` (the figures) and ``<name>.md`` (``render``'s page)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{name}.md").write_text(render(report))
