#!/usr/bin/env bash
# Long fuzzing runs, one target after another (-jobs=1), logs in fuzz/logs/.
set -u
cd "$(dirname "$0")"
secs=${1:-900}
mkdir -p logs
for t in ${TARGETS:-c_api pth gate_files}; do
    mkdir -p corpus/$t
    start=$(date +%s)
    cargo +nightly fuzz run -O $t corpus/$t seeds/$t -- -max_total_time=$secs -max_len=${MAX_LEN:-4096} -len_control=0 \
        -rss_limit_mb=4096 -print_final_stats=1 > logs/$t.log 2>&1
    echo "$t rc=$? wall=$(( $(date +%s) - start ))s" >> logs/summary.txt
done
