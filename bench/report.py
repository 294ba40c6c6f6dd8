"""What every benchmark writes: one JSON per bench at bench/results/<bench>/latest.json.

A result carries `date`, `command` and `machine` (so a figure can be traced to its run) and a
`figures` block: each figure is ours beside its anchor, measured in the same run, and the
ratio. Earlier runs live in git history, not in files beside the latest.

    figures = {"wake": vs_floor(0.33, "pinned H2D copy", 0.30, goal="<= 0.40 s")}
    write(result_path("gpu", args.out), {**result, "figures": figures})

Two kinds of anchor, two ratios:
  vs_floor    a bound nothing beats (a copy at the bus's speed): ratio = ours / floor, >= 1
  vs_anchor   another way to do the job (transformers): ratio = times better than the anchor
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REQUIRED = ("date", "command", "machine")


def result_path(bench: str, out: str | Path | None = None) -> Path:
    """--out when given, else bench/results/<bench>/latest.json."""
    return Path(out) if out else RESULTS / bench / "latest.json"


def vs_floor(ours: float | None, floor: str, floor_value: float | None, goal: str | None = None) -> dict[str, Any]:
    """A time beside the floor for the same work (lower is better; 1.0 is the best possible)."""
    ratio = ours / floor_value if ours is not None and floor_value else None
    return {"ours": ours, "anchor": floor, "anchor_value": floor_value, "ratio": ratio,
            "ratio_is": "ours / anchor", "goal": goal}


def vs_anchor(ours: float | None, anchor: str, anchor_value: float | None, higher_is_better: bool,
              goal: str | None = None) -> dict[str, Any]:
    """A time (lower is better) or a rate (higher is better) beside another way to do it;
    ratio > 1: ours is better by that factor."""
    ratio = None
    if ours and anchor_value:
        ratio = ours / anchor_value if higher_is_better else anchor_value / ours
    return {"ours": ours, "anchor": anchor, "anchor_value": anchor_value, "ratio": ratio,
            "ratio_is": "ours / anchor" if higher_is_better else "anchor / ours", "goal": goal}


def no_anchor(ours: float | None, goal: str | None = None) -> dict[str, Any]:
    """A figure with nothing to hold it against in the same run, only its goal."""
    return {"ours": ours, "anchor": None, "anchor_value": None, "ratio": None, "ratio_is": None, "goal": goal}


def write(path: Path, result: dict[str, Any]) -> Path:
    """Write the result (again: benches save after each part, so a run cut short keeps what it
    measured)."""
    missing = [key for key in REQUIRED if key not in result]
    if missing:
        raise ValueError(f"a bench result needs {', '.join(missing)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def print_figures(figures: dict[str, dict[str, Any]]) -> None:
    """The figures as a table: ours, the anchor's, the ratio."""
    width = max([len(name) for name in figures] + [6])
    print(f"{'figure':{width}} {'ours':>10} {'anchor':>10} {'ratio':>7}  anchor")
    for name, f in figures.items():
        cells = [f"{v:10.3f}" if isinstance(v, (int, float)) else f"{'-':>10}" for v in (f["ours"], f["anchor_value"])]
        ratio = f"{f['ratio']:6.2f}x" if f["ratio"] is not None else f"{'-':>7}"
        against = f"{f['anchor']} ({f['ratio_is']})" if f["anchor"] else ""
        print(f"{name:{width}} {cells[0]} {cells[1]} {ratio}  {against}{'; goal ' + f['goal'] if f['goal'] else ''}")
