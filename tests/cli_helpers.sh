# Helpers of the command-line test scripts (sourced): pass / fail counters and expectations on a
# command's exit status and output. The caller reports $fails at the end.
fails=0

pass() { echo "PASS  $1"; }
fail() { echo "FAIL  $1"; fails=$((fails + 1)); }

# check_ok NAME PATTERN MATCH COMMAND...: exits 0, and the output mentions PATTERN (MATCH 1) or does not (MATCH 0)
check_ok() {
    local name=$1 pattern=$2 match=$3
    shift 3
    local out found=0
    out=$("$@" 2>&1)
    local rc=$?
    grep -q -- "$pattern" <<<"$out" && found=1
    if [ $rc -eq 0 ] && [ $found -eq "$match" ]; then pass "$name"; else fail "$name (exit $rc)"; echo "$out" | tail -5; fi
}

# expect_ok NAME PATTERN COMMAND...: exits 0 and the output mentions PATTERN
expect_ok() { check_ok "$1" "$2" 1 "${@:3}"; }

# expect_ok_without NAME PATTERN COMMAND...: exits 0 and the output does not mention PATTERN
expect_ok_without() { check_ok "$1" "$2" 0 "${@:3}"; }

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
