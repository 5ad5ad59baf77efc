#!/usr/bin/env bash
# Long fuzzing sessions (scripts/fuzz.py's targets): each target in turn for SECONDS, corpus kept in WORKDIR so a
# later session goes on from it. Python-level findings are recorded and the run goes on (one input per distinct
# exception site, WORKDIR/findings/TARGET/*-input with its traceback); a crash, hang or memory blow-up stops
# libFuzzer, whose artifact lands in WORKDIR/artifacts/, and the target restarts until its time is spent.
#
#   scripts/fuzz.sh [SECONDS] [WORKDIR] [TARGETS]     defaults: 1800 s, build/fuzz, "gguf hf"
#   FUZZ_JOBS=2 scripts/fuzz.sh ...                   targets in parallel, one process each
#   FUZZ_SANITIZE=1 scripts/fuzz.sh 0 WORKDIR         replay WORKDIR's corpus and seeds on the ASan + UBSan build
#       (builds build/sanitize once). Not fuzzing: atheris's coverage needs its own libFuzzer, which gcc's preloaded
#       ASan runtime displaces, so under sanitizers the inputs the coverage-guided runs kept are run once each.
#
# Reproduce: python scripts/fuzz.py replay TARGET FILE. Summary: WORKDIR/summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${1:-1800}
WORK=${2:-build/fuzz}
TARGETS=${3:-gguf hf}
PY=${PYTHON:-python}
mkdir -p "$WORK/artifacts"
WORK=$(cd "$WORK" && pwd)
[ -d "$WORK/seeds" ] || $PY scripts/fuzz.py seeds "$WORK/seeds"

if [ "${FUZZ_SANITIZE:-0}" = 1 ]; then
    [ -e build/sanitize/dgguf/core ] || DGGUF_SANITIZE=1 $PY native/build_native.py build/sanitize
    for t in $TARGETS; do
        files=$(find "$WORK/corpus/$t" "$WORK/seeds/$t" -type f 2>/dev/null)
        [ -n "$files" ] || continue
        start=$SECONDS
        # shellcheck disable=SC2086
        PYTHONPATH="$PWD/build/sanitize${PYTHONPATH:+:$PYTHONPATH}" LD_PRELOAD="$(gcc -print-file-name=libasan.so)" \
            ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
            $PY scripts/fuzz.py replay "$t" $files > "$WORK/sanitized-$t.log" 2>&1
        rc=$?
        echo "sanitized replay $t: $(echo "$files" | wc -l) inputs, exit $rc, $((SECONDS - start)) s," \
             "$(grep -c ': ok (' "$WORK/sanitized-$t.log") ok" | tee -a "$WORK/summary.txt"
        [ $rc -ne 0 ] && grep -a -m5 "FINDING\|runtime error\|ERROR: AddressSanitizer" "$WORK/sanitized-$t.log"
    done
    exit 0
fi

fuzz_target() {
    local t=$1 end=$((SECONDS + SECONDS_PER_TARGET)) round=0
    mkdir -p "$WORK/corpus/$t"
    while [ $SECONDS -lt $end ]; do
        round=$((round + 1))
        DGGUF_FUZZ_FINDINGS="$WORK/findings/$t" $PY scripts/fuzz.py run "$t" "$WORK/corpus/$t" "$WORK/seeds/$t" \
            -max_total_time=$((end - SECONDS)) -timeout=5 -rss_limit_mb=3072 -print_final_stats=1 \
            -artifact_prefix="$WORK/artifacts/$t-" > "$WORK/$t-$round.log" 2>&1
        rc=$?
        runs=$(grep -a "stat::number_of_executed_units" "$WORK/$t-$round.log" | awk '{print $2}')
        rate=$(grep -a "stat::average_exec_per_sec" "$WORK/$t-$round.log" | awk '{print $2}')
        echo "$t round $round: exit $rc, ${runs:-?} inputs, ${rate:-?} inputs/s" | tee -a "$WORK/summary.txt"
        [ $rc -ne 0 ] && grep -a -m3 "ERROR\|ALARM\|out-of-memory\|Test unit written" "$WORK/$t-$round.log" \
            | tee -a "$WORK/summary.txt"
    done
    echo "$t: $(ls "$WORK/findings/$t" 2>/dev/null | grep -c -- -input) Python findings," \
         "$(ls "$WORK/artifacts" | grep -c "^$t-") artifacts" | tee -a "$WORK/summary.txt"
}

if [ "${FUZZ_JOBS:-1}" -gt 1 ]; then
    for t in $TARGETS; do fuzz_target "$t" & done
    wait
else
    for t in $TARGETS; do fuzz_target "$t"; done
fi
