"""Gateway start: exec -> "dormant serving on" line, beside a process that only imports torch.

    python bench/bench_gateway_start.py [--runs 5] [--out PATH]   # default bench/results/gateway-start/latest.json

DESIGN.md's goal is a gateway that starts in under a second because it never imports torch.
Each run starts `dormant serve` (`python -m dormant.cli serve`) on a free loopback port with an
empty DORMANT_HOME and records the wall time and the process's CPU time (user + system) when it
prints its readiness line. The anchor, measured in the same run, is `python -c "import torch"`: what every start would
pay at least if the gateway pulled torch in. Medians are compared; the load average is recorded
because neighbours on a small machine stretch the wall times.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from gateway_process import free_port
from report import print_figures, result_path, vs_anchor, write

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 1.0


def gateway_start() -> tuple[float, float]:
    """(wall, cpu) seconds from exec to the gateway's readiness line."""
    port = free_port()
    with tempfile.TemporaryDirectory() as home:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "dormant.cli", "serve", "--port", str(port)], cwd=ROOT,
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "DORMANT_HOME": home, "DORMANT_API_KEY": ""})
        try:
            for line in proc.stderr:
                if line.startswith("dormant serving on"):
                    wall = time.perf_counter() - t0
                    cpu = sum(psutil.Process(proc.pid).cpu_times()[:2])
                    return wall, cpu
            raise RuntimeError("the gateway exited without its readiness line")
        finally:
            proc.terminate()
            proc.wait(timeout=20)


def torch_import() -> tuple[float, float]:
    """(wall, cpu) seconds of a process that imports torch and exits."""
    t0 = time.perf_counter()
    before = os.times()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    after = os.times()
    return time.perf_counter() - t0, (after.children_user - before.children_user) + (
        after.children_system - before.children_system)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", help="JSON path (default bench/results/gateway-start/latest.json)")
    args = ap.parse_args()

    ours = [gateway_start() for _ in range(args.runs)]
    anchor = [torch_import() for _ in range(args.runs)]
    med = {name: {"wall_s": statistics.median(w for w, _ in runs), "cpu_s": statistics.median(c for _, c in runs)}
           for name, runs in (("gateway", ours), ("import_torch", anchor))}
    g, t = med["gateway"], med["import_torch"]
    result = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "loadavg": os.getloadavg()},
        "runs": {"gateway": ours, "import_torch": anchor},
        "median": med,
        "goal_s": GOAL_S,
        "met": g["wall_s"] < GOAL_S,
        "ratio_import_torch_over_gateway": t["wall_s"] / g["wall_s"],
        "figures": figures(med),
    }
    print_figures(result["figures"])
    print(f"wrote {write(result_path('gateway-start', args.out), result)}")


def figures(median: dict) -> dict:
    g, t = median["gateway"], median["import_torch"]
    return {
        "gateway start, wall s": vs_anchor(g["wall_s"], "python -c 'import torch', wall s", t["wall_s"],
                                           higher_is_better=False, goal=f"< {GOAL_S:.1f} s"),
        "gateway start, CPU s": vs_anchor(g["cpu_s"], "python -c 'import torch', CPU s", t["cpu_s"],
                                          higher_is_better=False),
    }


if __name__ == "__main__":
    main()
