#!/usr/bin/env python3
"""Pick a small, edge-covering subset of a fuzzing corpus to commit.

    ./target/x86_64-unknown-linux-gnu/release/<target> -merge=1 \
        -merge_control_file=/tmp/<target>.ctl /tmp/scratch seeds/<target> corpus/<target>
    python3 cover.py /tmp/<target>.ctl /tmp/<target>-cover [byte budget]

Reads the control file of libFuzzer's -merge=1 (for each input, the
coverage edges it reaches: its COV lines) and greedily picks inputs by new
edges per byte until every edge is covered or the budget is spent. Edges
only, not libFuzzer's finer features (hit-count buckets, comparisons): a
minimised corpus by features is several times larger. The picked inputs go
to fuzz/seeds/<target>/ as min-<sha1>; the stable replay (tests/fuzz_replay.rs)
runs them all.
"""
import os
import shutil
import sys

ctl, outdir = sys.argv[1], sys.argv[2]
budget = int(sys.argv[3]) if len(sys.argv) > 3 else 10**12
lines = open(ctl).read().split("\n")
n = int(lines[0])
files = lines[2 : 2 + n]
cov = {}
for line in lines[2 + n :]:
    parts = line.split()
    if parts and parts[0] == "COV":
        cov[int(parts[1])] = set(map(int, parts[2:]))
every = set().union(*cov.values()) if cov else set()
chosen, covered, size = [], set(), 0
remaining = dict(cov)
while True:
    best, best_score = None, 0.0
    for i, edges in remaining.items():
        gain = len(edges - covered)
        score = gain / (os.path.getsize(files[i]) + 64)
        if gain > 0 and score > best_score:
            best, best_score = i, score
    if best is None:
        break
    s = os.path.getsize(files[best])
    edges = remaining.pop(best)
    if size + s > budget:
        continue
    chosen.append(best)
    covered |= edges
    size += s
os.makedirs(outdir, exist_ok=True)
for i in chosen:
    shutil.copy(files[i], os.path.join(outdir, os.path.basename(files[i])))
print(f"{len(chosen)} inputs, {size} bytes, {len(covered)} of {len(every)} edges")
