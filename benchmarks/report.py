"""The results document: table columns and number formats, ``Results`` (JSON -> Markdown + PNG plots) and
``load_results``.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .env import GIB
from .timing import short_reason


# ----------------------------------------------------------------------------------------------------------
# formatting


def table_columns(*measures: Dict[str, Any], ms_title: str = "ms") -> List[Dict[str, Any]]:
    """A results table's columns: impl, median ms and spread, then ``measures`` (rates, ratios, memory, errors),
    then the note."""
    return [{"key": "impl", "title": "impl"}, {"key": "ms", "title": ms_title},
            {"key": "spread", "title": "p20-p80 ms"}, *measures, {"key": "note", "title": "note"}]


PEAK_COLUMN = {"key": "peak_gib", "title": "peak GiB", "fmt": "gib"}


def fmt_num(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) >= 10 ** digits or abs(x) < 10 ** -(digits - 1):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def fmt_err(x: Optional[float]) -> str:
    if x is None:
        return "n/a"
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return f"{x:.1e}"


def fmt_gib(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def shape_tag(**dims) -> str:
    return "-".join(f"{k}{v}" for k, v in dims.items())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------------------
# results document


class Results:
    """Sections (tables) and sweeps, saved as JSON and rendered to Markdown + PNG from the JSON alone, so that
    documents from several runs (``--only``) can be merged and re-rendered (``--merge``)."""

    def __init__(self, env: Dict[str, Any]):
        self.env = env
        self.rooflines: Dict[str, Any] = {}
        self.sections: List[Dict[str, Any]] = []
        self.sweeps: List[Dict[str, Any]] = []
        # when set, results.json and results.md (no plots) are rewritten there after every added section or sweep
        # point, so that a run killed by an external time limit in the middle of a benchmark keeps its tables
        self.autosave_dir: Optional[Path] = None

    # building
    def add_section(self, section: Dict[str, Any]) -> None:
        self.sections = [s for s in self.sections if s["id"] != section["id"]] + [section]
        self._autosave()

    def remove_section(self, section_id: str) -> None:
        self.sections = [s for s in self.sections if s["id"] != section_id]

    def add_sweep(self, sweep: Dict[str, Any]) -> None:
        self.sweeps = [s for s in self.sweeps if s["id"] != sweep["id"]] + [sweep]
        self._autosave()

    def _autosave(self) -> None:
        if self.autosave_dir is None:
            return
        try:
            self.autosave_dir.mkdir(parents=True, exist_ok=True)
            (self.autosave_dir / "results.json").write_text(json.dumps(self.to_json(), indent=1,
                                                                       default=_json_default))
            (self.autosave_dir / "results.md").write_text(self.markdown())
        except Exception as exc:  # noqa: BLE001 - a failed checkpoint must not stop the run
            print(f"[benchmarks] checkpoint to {self.autosave_dir} failed: {short_reason(exc)}", file=sys.stderr)

    def to_json(self) -> Dict[str, Any]:
        return {"env": self.env, "rooflines": self.rooflines, "sections": self.sections, "sweeps": self.sweeps}

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "Results":
        r = cls(data["env"])
        r.rooflines = data.get("rooflines", {})
        r.sections = data.get("sections", [])
        r.sweeps = data.get("sweeps", [])
        return r

    def merge(self, other: "Results") -> None:
        """Add ``other``'s sections and sweeps (``other`` wins on equal ids); commands are concatenated."""
        for s in other.sections:
            self.add_section(s)
        for s in other.sweeps:
            self.add_sweep(s)
        self.rooflines.update(other.rooflines)
        cmds = list(self.env.get("commands", [self.env.get("command")]))
        for c in other.env.get("commands", [other.env.get("command")]):
            if c not in cmds:
                cmds.append(c)
        errors = self.env.get("errors", []) + other.env.get("errors", [])
        self.env = {**self.env, **other.env, "commands": cmds, "errors": errors}

    # output
    def _prune(self) -> None:
        """Drop "skipped" placeholder sections of a group that has real sections (from a merged run)."""
        real = {s.get("group") for s in self.sections if not s.get("placeholder")}
        self.sections = [s for s in self.sections if not (s.get("placeholder") and s.get("group") in real)]

    def write(self, out_dir: Path) -> List[Path]:
        self._prune()
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(self.to_json(), indent=1, default=_json_default))
        pngs = self.plot(out_dir)
        (out_dir / "results.md").write_text(self.markdown(pngs))
        return [out_dir / "results.md", out_dir / "results.json", *pngs]

    def markdown(self, pngs: Sequence[Path] = ()) -> str:
        e = self.env
        lines = ["# edge-kernels benchmark results", ""]
        dev = e["device"]
        if e.get("sms"):
            dev += f" ({e['sms']} SMs, {e['memory_gib']} GiB)"
        lines.append(f"- device: {dev}")
        lines.append(f"- torch {e['torch']}, triton {e['triton']}, CUDA {e['cuda']}, python {e['python']}")
        anchors = ", ".join(f"{k} {v}" for k, v in e.get("anchors", {}).items() if v) or "none installed"
        lines.append(f"- anchors installed: {anchors}")
        lines.append(f"- date: {e['date']}")
        for c in e.get("commands", [e.get("command")]):
            lines.append(f"- command: `{c}`")
        lines.append(f"- mode: {e['mode']}" + (" (TRITON_INTERPRET=1: Triton rows run in the interpreter, their "
                                              "times are not kernel times)" if e.get("triton_interpret") == "1"
                                              else ""))
        copy = self.rooflines.get("copy")
        if copy and copy.get("status") == "ok":
            lines.append(f"- roofline, memory: device-to-device copy of {copy['bytes'] / GIB:.2f} GiB, "
                         f"{fmt_num(copy['ms'])} ms = **{fmt_num(copy['tbps'])} TB/s** (read + write)")
        for err in e.get("errors", []):
            lines.append(f"- **error**: {err}")
        lines.append("")
        lines.append("Columns: see benchmarks/README.md. `ms` = median, `p20-p80` = spread; peak GiB = incremental "
                     "peak of one call (outputs and gradients included, inputs not); errors are max |x - x_fp64| "
                     "over all rows against a float64 oracle on the same (rounded) inputs.")
        lines.append("")
        for s in self.sections:
            lines += _section_md(s)
        for sw in self.sweeps:
            lines += _sweep_md(sw)
        if pngs:
            lines.append("## Plots")
            lines.append("")
            for p in pngs:
                lines.append(f"![{p.stem}]({p.name})")
            lines.append("")
        return "\n".join(lines)

    def plot(self, out_dir: Path) -> List[Path]:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            print(f"[benchmarks] plots skipped: matplotlib unavailable ({short_reason(exc)})", file=sys.stderr)
            return []
        paths = []
        groups: Dict[str, List[Dict[str, Any]]] = {}
        for s in self.sections:
            groups.setdefault(s.get("group", s["id"]), []).append(s)
        for group, secs in groups.items():
            p = _plot_bars(group, secs, out_dir)
            if p:
                paths.append(p)
        for sw in self.sweeps:
            p = _plot_sweep(sw, out_dir, self.env)
            if p:
                paths.append(p)
        return paths


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    raise TypeError(type(o).__name__)


def load_results(path: Path) -> Results:
    return Results.from_json(json.loads(Path(path).read_text()))


def _status_note(row: Dict[str, Any]) -> str:
    if row["status"] == "ok":
        return row.get("note", "")
    head = "OOM" if row["status"] == "oom" else f"skipped: {row.get('reason', '')}"
    return head + (f" ({row['note']})" if row.get("note") else "")


def _cell(row: Dict[str, Any], col: Dict[str, Any]) -> str:
    key = col["key"]
    if key == "impl":
        return row["impl"]
    if key == "note":
        return _status_note(row).replace("|", "/")
    if row["status"] != "ok":
        return "-"
    if key == "spread":
        return f"{fmt_num(row.get('p20'))}-{fmt_num(row.get('p80'))}"
    v = row.get(key)
    kind = col.get("fmt", "num")
    if kind == "err":
        return fmt_err(v)
    if kind == "gib":
        return fmt_gib(v)
    return fmt_num(v)


def _section_md(s: Dict[str, Any]) -> List[str]:
    lines = [f"## {s['title']}", ""]
    for note in s.get("notes", []):
        lines.append(f"- {note}")
    if s.get("notes"):
        lines.append("")
    cols = s["columns"]
    lines.append("| " + " | ".join(c["title"] for c in cols) + " |")
    lines.append("|" + "|".join("---" if c["key"] in ("impl", "note") else "---:" for c in cols) + "|")
    for row in s["rows"]:
        lines.append("| " + " | ".join(_cell(row, c) for c in cols) + " |")
    lines.append("")
    return lines


def _sweep_md(sw: Dict[str, Any]) -> List[str]:
    lines = [f"## {sw['title']}", ""]
    for note in sw.get("notes", []):
        lines.append(f"- {note}")
    lines.append("")
    xs = sw["xs"]
    for mode in sw["modes"]:
        lines.append(f"**{mode}**: median ms / peak GiB per {sw['x_name']}")
        lines.append("")
        lines.append("| impl | " + " | ".join(f"{sw['x_name']}={x}" for x in xs) + " |")
        lines.append("|---|" + "---:|" * len(xs))
        for impl, per_mode in sw["series"].items():
            cells = []
            for pt in per_mode.get(mode, []):
                if pt["status"] == "ok":
                    cells.append(f"{fmt_num(pt['ms'])} / {fmt_gib(pt.get('peak_gib'))}")
                elif pt["status"] == "oom":
                    cells.append("OOM")
                else:
                    cells.append("skipped")
            reasons = sorted({pt.get("reason", "") for pt in per_mode.get(mode, []) if pt["status"] == "skipped"})
            label = impl + (f" (skipped: {'; '.join(reasons)})" if reasons else "")
            lines.append(f"| {label.replace('|', '/')} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _plot_bars(group: str, secs: List[Dict[str, Any]], out_dir: Path) -> Optional[Path]:
    import matplotlib.pyplot as plt

    def plotted(r):  # interpreter rows check results; their times would only distort the axis
        return r["status"] == "ok" and "interpreter" not in r["impl"]

    secs = [s for s in secs if any(plotted(r) for r in s["rows"])]
    if not secs:
        return None
    fig, axes = plt.subplots(1, len(secs), figsize=(6.5 * len(secs), 0.5 * max(len(s["rows"]) for s in secs) + 2.0),
                             squeeze=False)
    for ax, s in zip(axes[0], secs):
        rows = [r for r in s["rows"] if plotted(r)]
        names = [r["impl"] for r in rows]
        ms = [r["ms"] for r in rows]
        colors = ["tab:green" if n.startswith("ours") else "tab:gray" for n in names]
        y = range(len(rows))
        ax.barh(list(y), ms, color=colors,
                xerr=[[r["ms"] - r["p20"] for r in rows], [r["p80"] - r["ms"] for r in rows]])
        ax.set_yticks(list(y))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("ms (median, p20-p80 bars); lower is better")
        ax.set_title(s.get("mode", s["id"]), fontsize=10)
        for yi, r in zip(y, rows):  # label right of the p80 whisker, so the two never overlap
            ax.text(max(r["ms"], r["p80"]), yi, f"  {fmt_num(r['ms'])} ms", va="center", fontsize=7)
        ax.set_xlim(0, 1.18 * max(max(r["p80"], r["ms"]) for r in rows))
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(secs[0].get("group_title", group), fontsize=11)
    fig.tight_layout()
    path = out_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", group) + ".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short_int(x: int) -> str:
    if x >= 1024 and x % 1024 == 0:
        return f"{x // 1024}k"
    if x >= 1000:
        return f"{x / 1024:.1f}k".replace(".0k", "k")
    return str(x)


def _plot_sweep(sw: Dict[str, Any], out_dir: Path, env: Dict[str, Any]) -> Optional[Path]:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    modes = sw["modes"]
    fig, axes = plt.subplots(2, len(modes), figsize=(6.0 * len(modes), 8.0), squeeze=False)
    markers = "osD^v<>px*"
    impls = list(sw["series"])
    for j, mode in enumerate(modes):
        ax_t, ax_m = axes[0][j], axes[1][j]
        any_mem = False
        for impl in impls:
            pts = sw["series"][impl].get(mode, [])
            ok = [p for p in pts if p["status"] == "ok"]
            oom = [p["x"] for p in pts if p["status"] == "oom"]
            if not ok:
                continue
            label = impl + (f" (OOM at {sw['x_name']}>={_short_int(min(oom))})" if oom else "")
            k = impls.index(impl)  # same marker/colour for an impl in every panel
            style = dict(marker=markers[k % len(markers)], color=f"C{k % 10}", label=label,
                         linewidth=2.4 if impl.startswith("ours") else 1.3)
            ax_t.plot([p["x"] for p in ok], [p["ms"] for p in ok], **style)
            mem = [p for p in ok if p.get("peak_gib") is not None]
            if mem:
                any_mem = True
                ax_m.plot([p["x"] for p in mem], [max(p["peak_gib"], 1e-4) for p in mem], **style)
        ax_t.set_title(f"{mode}: time", fontsize=10)
        ax_m.set_title(f"{mode}: peak memory", fontsize=10)
        for ax, ylabel, has_data in ((ax_t, "median ms", True), (ax_m, "peak incremental GiB", any_mem)):
            ax.set_ylabel(ylabel)
            ax.set_xlabel(sw["x_name"])
            if not has_data:
                ax.set_xticks([])
                ax.set_yticks([])
                ax.text(0.5, 0.5, f"peak memory: n/a on {env.get('device_type', 'this device')}",
                        ha="center", va="center", transform=ax.transAxes)
                continue
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(FixedLocator(sw["xs"]))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: _short_int(int(round(x)))))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(f"{sw['title']}\n{env['device']}, {env['date']}", fontsize=10)
    fig.tight_layout()
    path = out_dir / f"{sw['id']}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
