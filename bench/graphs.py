"""Draw the benchmark's graphs from the JSON results that bench.py writes (matplotlib).

    python bench/bench.py --json bench/results.json
    python bench/graphs.py bench/results.json            # writes docs/bench_*.png

docs/bench_capacity.png: the capacity ladder, RSS per stream and chunk lateness against the
number of streams. docs/bench_fanout.png: fan-out latency and deliveries per second against
the number of subscribers. A point where streams failed or messages were lost says how many.
"""

import argparse
import json
import math
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure  # drawn straight to files: no pyplot, no window

DOCS = Path(__file__).resolve().parent.parent / "docs"
LOOKS = [("tab:blue", "o-"), ("tab:orange", "s--"), ("tab:green", "^:")]  # one per server


def draw(
    axes: Axes, rows: list[dict], name: str, x: str, y: str, look: tuple, marked=False, **options
) -> None:
    """One server's (or setup's) line: y against x over its rows, NaN (unmeasured) left out;
    if `marked`, points where something failed say how much."""
    points = sorted((row[x], row[y], row) for row in rows if not math.isnan(row.get(y) or math.nan))
    color, style = look
    options.setdefault("label", name)
    axes.plot([p[0] for p in points], [p[1] for p in points], style, color=color, **options)
    for number, (at, value, row) in enumerate(points):
        failed = row.get("errors", 0) + row.get("lost", 0) + row.get("duplicated", 0)
        if failed and marked:  # every other one higher, so that neighbours do not overlap
            axes.annotate(
                f"{failed:,} failed",
                (at, value),
                textcoords="offset points",
                xytext=(-10, 6 + 10 * (number % 2)),
                color=color,
                fontsize=7,
            )


def target_line(axes: Axes, at: float, text: str) -> None:
    axes.axhline(at, color="grey", linewidth=0.8)
    axes.annotate(
        text,
        (0.02, at),
        xycoords=("axes fraction", "data"),
        color="grey",
        textcoords="offset points",
        xytext=(0, 4),
        fontsize=8,
    )


def finish(figure: Figure, title: str, results: dict, rows: list[dict], path: Path) -> None:
    about = results["machine"]
    others = [row["other CPU %"] for row in rows]
    for axes in figure.axes:
        axes.grid(alpha=0.3)
        axes.set_ylim(bottom=0)
        axes.legend(fontsize=7)
    figure.suptitle(
        f"{title}\n{results['date']}, {about['cores']} cores ({about['cpu']}), Python "
        f"{about['python']}\nthe client on the same cores; other programs used "
        f"{min(others):.0f}-{max(others):.0f}% of one core meanwhile",
        fontsize=10,
    )
    figure.savefig(path, dpi=110)


def capacity(results: dict, path: Path) -> None:
    window = results["settings"]["window"] or "all"
    rows = [row for row in results["capacity"] if row["opening at once"] == window]
    figure = Figure(figsize=(11, 4.4), layout="constrained")
    memory, lateness = figure.subplots(1, 2)
    for look, name in zip(LOOKS, dict.fromkeys(row["server"] for row in rows), strict=False):
        mine = [row for row in rows if row["server"] == name]
        draw(memory, mine, name, "streams", "RSS KB/stream", look, marked=True)
        draw(lateness, mine, name, "streams", "late p99 ms", look, label=f"{name}, p99")
        draw(lateness, mine, name, "streams", "late p50 ms", look, alpha=0.4, label="p50")
    memory.set(title="Server RSS growth per open stream", xlabel="concurrent streams")
    memory.set(ylabel="KB per stream")
    target_line(lateness, 500, "target: p99 within 500 ms")
    lateness.set(title="Chunk lateness against schedule, once all are open")
    lateness.set(xlabel="concurrent streams", ylabel="ms late")
    chunks, interval = results["settings"]["chunks"], results["settings"]["interval"]
    title = (
        f"Capacity: step 2's app on ONE process, streams of {chunks} chunks {interval:g} s apart"
    )
    finish(figure, title, results, rows, path)


def fanout(results: dict, path: Path) -> None:
    rows, rate = results["fanout"], results["settings"]["rate"]
    figure = Figure(figsize=(11, 4.4), layout="constrained")
    latency, deliveries = figure.subplots(1, 2)
    for look, name in zip(LOOKS, dict.fromkeys(row["setup"] for row in rows), strict=False):
        mine = [row for row in rows if row["setup"] == name]
        draw(latency, mine, name, "subscribers", "latency p99 ms", look, label=f"{name}, p99")
        draw(latency, mine, name, "subscribers", "latency p50 ms", look, alpha=0.4, label="p50")
        draw(deliveries, mine, name, "subscribers", "deliveries/s", look, marked=True)
    target_line(latency, 500, "target: p99 within 500 ms")
    latency.set(title="Latency: from the POST's response to each receipt")
    latency.set(xlabel="subscribers", ylabel="ms")
    most = max(row["subscribers"] for row in rows)
    deliveries.plot(
        [0, most],
        [0, most * rate],
        color="grey",
        linewidth=0.8,
        label=f"every subscriber, {rate:g} messages/s",
    )
    deliveries.set(title="Deliveries per second", xlabel="subscribers", ylabel="deliveries/s")
    seconds = results["settings"]["seconds"]
    title = f"Fan-out: the chat step, one poster at {rate:g} messages/s for {seconds:g} s"
    finish(figure, title, results, rows, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Draw the benchmark's graphs from its JSON.")
    parser.add_argument("results", type=Path, help="the file bench.py --json wrote")
    parser.add_argument("--into", type=Path, default=DOCS, help="folder for the PNGs (docs/)")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    for part, drawing in (("capacity", capacity), ("fanout", fanout)):
        if results.get(part):
            drawing(results, args.into / f"bench_{part}.png")
            print(args.into / f"bench_{part}.png")


if __name__ == "__main__":
    main()
