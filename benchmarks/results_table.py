"""Render one GPU benchmark run as the record `benchmarks/RESULTS.md` keeps (W1–W5 beside the peers and targets).

    pytest benchmarks --benchmark-only --benchmark-json=bench.json -q
    python benchmarks/results_table.py bench.json --command "pytest benchmarks --benchmark-only ..." >> RESULTS.md

Everything comes from the rows' `extra_info` (the benchmarks compute ms, throughput, % of the matmul peak and the
speedups over the peers of the same process); this script only lays them out and checks them against the targets
of BENCHMARKS.md (stated for one H100).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Optional

PEERS = ("ref", "compile", "compile-ro")
COLUMNS = ("fast", "fast-eager", "ref", "compile", "compile-ro")
HEADERS = ("fast", "fast, eager step", "ref eager", "compile", "compile reduce-overhead")


def load(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info", {}))
        info["_name"] = b.get("name", "")
        info["_median_s"] = (b.get("stats") or {}).get("median")
        rows.append(info)
    return dict(rows=rows, machine=data.get("machine_info", {}), commit=data.get("commit_info", {}))


def _by_path(rows: list, workload: str) -> dict:
    return {r["path"]: r for r in rows if r.get("workload") == workload}


def _fmt(v: Optional[float], digits: int = 1) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def _verdict(ok: Optional[bool]) -> str:
    return "–" if ok is None else ("met" if ok else "**not met**")


def _best_peer(row: dict) -> tuple:
    ratios = {p: row.get(f"speedup_vs_{p}") for p in PEERS if row.get(f"speedup_vs_{p}") is not None}
    if not ratios:
        return None, None
    peer = min(ratios, key=ratios.get)  # the fastest peer gives the smallest speedup
    return peer, ratios[peer]


def workload_rows(rows: list) -> list:
    """[(label, cells by column, fast / best peer, target, verdict)] for W1–W4."""
    out = []
    specs = [
        ("W1", "W1 ms (samples/s)", lambda r: f"{_fmt(r.get('ms'))} ({_fmt(r.get('samples_per_s'), 0)})",
         "≤ 90 ms", lambda f: f.get("ms") is not None and f["ms"] <= 90),
        ("W2", "W2 ms (% of peak)", lambda r: f"{_fmt(r.get('ms'))} ({_fmt(r.get('pct_of_matmul_peak'), 0)} %)",
         "≤ 200 ms, ≥ 78 %, ≥ 1.55× compile",
         lambda f: None if f.get("ms") is None else (f["ms"] <= 200 and (f.get("pct_of_matmul_peak") or 0) >= 78
                                                     and (f.get("speedup_vs_compile") or 0) >= 1.55)),
        ("W3", "W3 ms/step", lambda r: _fmt(r.get("ms"), 2), "≤ 5 ms",
         lambda f: f.get("ms") is not None and f["ms"] <= 5),
    ]
    for workload, label, cell, target, check in specs:
        paths = _by_path(rows, workload)
        if not paths:
            continue
        cells = {p: cell(paths[p]) for p in COLUMNS if p in paths}
        fast = paths.get("fast", {})
        peer, ratio = _best_peer(fast)
        vs = f"{ratio:.2f}× ({peer})" if ratio is not None else "–"
        out.append((label, cells, vs, target, _verdict(check(fast) if fast else None)))
    w4 = _by_path(rows, "W4").get("fast")
    if w4:
        peak, slow = w4.get("peak_mem_gib"), w4.get("slowdown_vs_unbounded_fast")
        mem = "–" if peak is None else f"{_fmt(peak, 2)} GiB ({_fmt(slow, 2)}×)"
        cells = {"fast": f"{mem}, {w4.get('max_particles_fast')}",
                 "ref": f"–, {w4.get('max_particles_ref')}"}
        ok = None
        if peak is not None:
            ok = peak <= 8 and (slow is None or slow <= 1.05) and (w4.get("max_particles_fast") or 0) >= 1024
        out.append(("W4 peak GiB at the 8 GiB bound (slowdown), max particles/state", cells, "–",
                    "≤ 8 GiB at ≤ 5 %, 1024", _verdict(ok)))
    return out


def kernel_rows(rows: list) -> list:
    """[(op, pass, fast GB/s (% copy), eager, compile, fast / best peer, target)] for the W5 op rows."""
    ops = {}
    for r in rows:
        if "op" in r:
            ops.setdefault((r["op"], r["pass_"]), {})[r["impl"]] = r
    out = []
    for (op, pass_), impls in sorted(ops.items()):
        def cell(impl):
            r = impls.get(impl)
            return "–" if r is None else f"{_fmt(r.get('gbps'), 0)} ({_fmt(r.get('pct_copy_bw'), 0)} %)"
        fast = impls.get("fast", {})
        ratios = [fast.get(f"speedup_vs_{p}") for p in ("eager", "compile") if fast.get(f"speedup_vs_{p}")]
        target, ok = "–", None
        if op == "ln_modulate":
            need = 85 if pass_ == "fwd" else 75
            target = f"≥ {need} % of copy"
            ok = None if fast.get("pct_copy_bw") is None else fast["pct_copy_bw"] >= need
        out.append((op, pass_, cell("fast"), cell("eager"), cell("compile"),
                    f"{min(ratios):.2f}×" if ratios else "–", target, _verdict(ok)))
    return out


def render(data: dict, command: str, date: str) -> str:
    rows = data["rows"]
    first = next((r for r in rows if "gpu" in r), {})
    commit = (data.get("commit") or {}).get("id", "")[:12] or _git_commit()
    lines = [f"### {date} — {first.get('gpu', '?')} — torch {first.get('torch', '?')}, triton "
             f"{first.get('triton', '?')}, CUDA {first.get('cuda', '?')}, mfm_fast {commit}",
             f"command: `{command}`", ""]
    if "cpu" in str(first.get("gpu", "cpu")).lower():
        lines += ["**CPU smoke run: these are not performance numbers and do not belong in RESULTS.md.**", ""]
    peak = next((r.get("matmul_peak_tflops") for r in rows if r.get("matmul_peak_tflops")), None)
    lines.append(f"bf16 matmul peak measured in the run (8192³ A @ A): {_fmt(peak, 0)} TFLOP/s; device copy "
                 f"bandwidth: {_fmt(first.get('copy_gbps'), 0)} GB/s.")
    lines.append("")
    work = workload_rows(rows)
    if work:
        lines.append("| workload | " + " | ".join(HEADERS) + " | fast / best peer | target | |")
        lines.append("|---" * (len(HEADERS) + 4) + "|")
    for label, cells, vs, target, verdict in work:
        lines.append(f"| {label} | " + " | ".join(cells.get(c, "–") for c in COLUMNS) +
                     f" | {vs} | {target} | {verdict} |")
    kern = kernel_rows(rows)
    if kern:
        lines += ["", "W5 fused ops, GB/s (% of copy bandwidth):", "",
                  "| op | pass | fast | eager | compile | fast / best peer | target | |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(map(str, k)) + " |" for k in kern]
    return "\n".join(lines) + "\n"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+", help="pytest-benchmark JSON of one GPU session (--benchmark-json), one file per "
                                           "suite when the suites ran as separate commands")
    p.add_argument("--command", default="pytest benchmarks --benchmark-only --benchmark-json=bench.json -q",
                   help="the command that made the JSON, recorded with the table")
    p.add_argument("--date", default=None, help="the run's date (default: from the JSON)")
    a = p.parse_args(argv)
    parts = [load(path) for path in a.json]
    data = dict(rows=[r for part in parts for r in part["rows"]], commit=parts[0]["commit"])
    if not data["rows"]:
        p.error(f"{', '.join(a.json)} hold no benchmark rows (was the run made with --benchmark-only?)")
    with open(a.json[0]) as f:
        date = a.date or json.load(f).get("datetime", "?")[:10]
    sys.stdout.write(render(data, a.command, date))
    return 0


if __name__ == "__main__":
    sys.exit(main())
