# Helpers of the command-line test scripts (sourced): pass / fail counters and expectations on a
# command's exit status and output. The caller reports $fails at the end.
fails=0

pass() { echo "PASS  $1"; }
fail() { echo "FAIL  $1"; fails=$((fails + 1)); }

# expect_ok NAME PATTERN COMMAND...: exits 0 and the output mentions PATTERN
expect_ok() {
    local name=$1 pattern=$2
    shift 2
    local out
    out=$("$@" 2>&1)
    local rc=$?
    if [ $rc -eq 0 ] && grep -q -- "$pattern" <<<"$out"; then pass "$name"; else fail "$name (exit $rc)"; echo "$out" | tail -5; fi
}

# expect_fail NAME PATTERN COMMAND...: exits non-zero and the output mentions PATTERN
expect_fail() {
    local name=$1 pattern=$2
    shift 2
    local out
    out=$(timeout 60 "$@" 2>&1)
    local rc=$?
    if [ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -q -- "$pattern" <<<"$out"; then pass "$name (exit $rc: $(grep -m1 -- "$pattern" <<<"$out"))"
    else fail "$name (exit $rc)"; echo "$out" | tail -5; fi
}
