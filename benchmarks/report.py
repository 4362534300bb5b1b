"""The results as a terminal table, as markdown, and as a PNG bar chart."""

import importlib

COLUMNS = (
    "contender",
    "status",
    "median ms",
    "IQR ms",
    "spread",
    "peak MiB",
    "GB/s",
    "of copy",
    "vs eager",
    "vs compile",
)


def _number(value, pattern):
    return "-" if value is None else pattern.format(value)


UNSTABLE_MARK = " !"


def _unstable_names(result):
    """Contenders of one case whose timing stayed unstable (see benchmarks/measure.py)."""
    return {entry["name"] for entry in result["contenders"] if entry.get("unstable")}


def _marked(text, shaky):
    """A figure computed from an unstable timing carries the mark that the notes explain."""
    return text + UNSTABLE_MARK if shaky and text != "-" else text


def _cells(entry, unstable_names=frozenset()):
    if entry["status"] != "ok":
        return [entry["name"], entry["status"], entry["reason"]]
    peak = entry["peak_extra_bytes"]
    own = bool(entry.get("unstable"))
    spread = entry["iqr_s"] / entry["median_s"] if entry["median_s"] else 0.0
    return [
        entry["name"],
        "ok",
        _marked(_number(entry["median_s"] * 1e3, "{:.3f}"), own),
        _number(entry["iqr_s"] * 1e3, "{:.3f}"),
        f"{100 * spread:.0f}%",
        _number(None if peak is None else peak / 2**20, "{:.2f}"),
        _number(entry["gbps"], "{:.1f}"),
        _number(None if entry["of_copy"] is None else 100 * entry["of_copy"], "{:.0f}%"),
        _marked(
            _number(entry["speedup_vs_eager"], "{:.2f}x"), own or "eager" in unstable_names
        ),
        _marked(
            _number(entry["speedup_vs_compile"], "{:.2f}x"), own or "compile" in unstable_names
        ),
    ]


def unstable_notes(result):
    """One warning line per contender whose timing stayed unstable."""
    return [
        f"! {entry['name']}: unstable timing, {entry['unstable']}; its time and every ratio "
        "marked ! are unreliable"
        for entry in result["contenders"]
        if entry.get("unstable")
    ]


def _shape_text(shape):
    parts = [f"N={shape['n']}"]
    if shape["c"] is not None:
        parts.append(f"C={shape['c']}, {shape['h']}x{shape['w']}")
    parts.append(f"K={shape['k']}" + (" dense" if shape["dense"] else ""))
    return ", ".join(parts)


def _case_title(result):
    title = f"{result['preset']} ({_shape_text(result['shape'])}) - {result['case']}"
    if not result["has_backward"]:
        title += " (forward only: no backward)"
    if result["copy"] is not None:
        copy = result["copy"]
        spread = 100 * copy["iqr_s"] / copy["median_s"]
        title += (
            f" - {result['bytes'] / 2**20:.2f} MiB moved; copy of the same bytes "
            f"{copy['median_s'] * 1e3:.3f} ms (spread {spread:.0f}%) = {copy['gbps']:.1f} GB/s"
            + (f"{UNSTABLE_MARK} ({copy['unstable']})" if copy.get("unstable") else "")
        )
    return title


def header_lines(run):
    machine, software, settings = run["machine"], run["software"], run["settings"]
    return [
        f"sokd {software['sokd']} benchmark, {run['date']}",
        f"device: {machine['device']} ({machine['device_name']})"
        + (f", torch threads: {machine['threads']}" if machine["threads"] else "")
        + (
            f", load average {machine['load_average_1min']:.1f} at start"
            if machine["load_average_1min"] is not None
            else ""
        )
        + f"; torch {software['torch']}; dtype {settings['dtype']}"
        + ("; --quick" if settings["quick"] else ""),
        f"sokd backends available: {', '.join(run['backends_available'])}",
        (
            "times: forward+backward, median and interquartile range over repeated runs after "
            "warm-up; spread = IQR / median; speed-ups are ratios of medians; a timing whose "
            "spread stays above 25% or that ran while the load average exceeded the core "
            "count (measured up to 3 times) is marked !"
        ),
    ] + (
        [f"WARNING: {busy} when the run started; timings are unreliable"]
        if (busy := _busy_at_start(machine))
        else []
    )


def _busy_at_start(machine):
    load, cores = machine["load_average_1min"], machine.get("cores")
    if load is None or cores is None or load <= cores:
        return None
    return f"load average {load:.1f} above {cores} cores"


def text_table(run):
    lines = header_lines(run)
    for result in run["results"]:
        lines.append("")
        lines.append(_case_title(result))
        if result["status"] == "skipped":
            lines.append(f"  skipped: {result['reason']}")
            continue
        shaky = _unstable_names(result)
        rows = [_cells(entry, shaky) for entry in result["contenders"]]
        widths = [
            max(len(COLUMNS[i]), *(len(r[i]) for r in rows if len(r) == len(COLUMNS)))
            for i in range(len(COLUMNS))
        ]
        lines.append(
            "  "
            + "  ".join(
                c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(COLUMNS, widths))
            )
        )
        for row in rows:
            if len(row) != len(COLUMNS):
                name, status, reason = row
                lines.append(f"  {name.ljust(widths[0])}  {status.ljust(widths[1])}  {reason}")
            else:
                lines.append(
                    "  "
                    + "  ".join(
                        c.rjust(w) if i > 1 else c.ljust(w)
                        for i, (c, w) in enumerate(zip(row, widths))
                    )
                )
        lines += ["  " + note for note in unstable_notes(result)]
    return "\n".join(lines)


def markdown(run, command):
    lines = [f"# sokd benchmark: {run['machine']['device_name']}", ""]
    lines += [f"- {line}" for line in header_lines(run)]
    lines.append(f"- command: `{command}`")
    lines.append(
        "- peak MiB: peak extra memory of one step; GB/s: bytes a fused kernel must "
        "read and write, over the median time; of copy: that rate relative to a "
        "device-to-device copy of the same bytes timed in the same run"
    )
    for result in run["results"]:
        lines += ["", f"## {_case_title(result)}", ""]
        if result["status"] == "skipped":
            lines.append(f"Skipped: {result['reason']}")
            continue
        lines.append("| " + " | ".join(COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        shaky = _unstable_names(result)
        for entry in result["contenders"]:
            cells = _cells(entry, shaky)
            if len(cells) != len(COLUMNS):
                cells = cells + [""] * (len(COLUMNS) - len(cells))
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        notes = unstable_notes(result)
        if notes:
            lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def plot(run, path):
    """Write a bar chart of speed-ups over eager; returns None, or why no chart was written."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        return (
            "matplotlib is not installed, so no plot was written "
            "(pip install matplotlib, or pip install 'sokd[plot]')"
        )
    matplotlib.use("Agg")
    pyplot = importlib.import_module("matplotlib.pyplot")

    groups = [r for r in run["results"] if r["status"] == "ok"]
    names = []
    for result in groups:
        for entry in result["contenders"]:
            if entry["status"] == "ok" and entry["name"] != "eager" and entry["name"] not in names:
                names.append(entry["name"])
    figure, axes = pyplot.subplots(figsize=(max(6, 1.2 * len(groups)), 4.5))
    width = 0.8 / max(len(names), 1)
    for index, name in enumerate(names):
        positions, heights = [], []
        for group, result in enumerate(groups):
            for entry in result["contenders"]:
                if entry["name"] == name and entry["status"] == "ok":
                    positions.append(group + (index - (len(names) - 1) / 2) * width)
                    heights.append(entry["speedup_vs_eager"])
        axes.bar(positions, heights, width, label=name)
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_yscale("log")
    axes.set_ylabel("speed-up over eager reference (x)")
    axes.set_xticks(range(len(groups)))
    axes.set_xticklabels(
        [
            f"{r['preset']}\n{r['case']}" + (UNSTABLE_MARK if _unstable_names(r) else "")
            for r in groups
        ],
        fontsize=7,
        rotation=30,
        ha="right",
    )
    if any(_unstable_names(r) for r in groups):
        figure.text(0.01, 0.01, "! unstable timings: see the table's notes", fontsize=7)
    axes.set_title(f"sokd forward+backward, {run['machine']['device_name']}")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return None
