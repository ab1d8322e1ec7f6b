"""Where the warps stall, from Nsight Compute's per-instruction export
(`ncu -i rep.ncu-rep --page source --csv --print-source sass`): the top instructions by stall
samples, and the samples summed per opcode and per stall reason.
Usage: python scripts/ncu_hotspots.py attn_sass.csv [--top 25]"""

import argparse
import csv
import re
from collections import Counter


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    with open(args.csv, newline="") as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if "Source" in line and "," in line)  # skip ncu's banner
    rows = list(csv.DictReader(lines[start:]))
    cols = list(rows[0].keys())
    src = next(c for c in cols if c.strip().strip('"') == "Source" or c.startswith("Source"))
    samples = next(c for c in cols if "Warp Stall Sampling (All" in c)
    executed = next((c for c in cols if c.startswith("Instructions Executed")), None)
    reasons = [c for c in cols if c.startswith("stall_") or re.match(r"^(smsp__pcsamp|Stall )", c)]
    total = sum(number(r[samples]) for r in rows) or 1.0
    print(f"{len(rows)} SASS instructions, {total:.0f} stall samples; columns: {', '.join(cols)[:600]}")
    by_op, by_reason = Counter(), Counter()
    for r in rows:
        op = r[src].split()[0] if r[src].split() else "?"
        if op.startswith("@"):
            op = r[src].split()[1] if len(r[src].split()) > 1 else op
        by_op[op.split(".")[0]] += number(r[samples])
        for c in reasons:
            by_reason[c] += number(r[c])
    print("samples by opcode: " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in by_op.most_common(12)))
    if by_reason:
        tot_r = sum(by_reason.values()) or 1.0
        print("samples by reason: " + ", ".join(f"{k} {100 * v / tot_r:.1f}%" for k, v in by_reason.most_common(10)))
    print(f"top {args.top} instructions (share of samples, executed, address, SASS):")
    for i, r in enumerate(sorted(rows, key=lambda r: -number(r[samples]))[: args.top]):
        addr = r.get("Address", r.get("# Address", str(i)))
        ex = r[executed] if executed else ""
        print(f"  {100 * number(r[samples]) / total:5.1f}%  {ex:>8}  {addr:>6}  {r[src][:90]}")


if __name__ == "__main__":
    main()
