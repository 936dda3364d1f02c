# vm: fuse=on timeout=900
# As an unprivileged user, in a user namespace: cot run's tracing and memoization; and the
# integration tests of rootless mode.
. "$COT_VM_RUN/scenarios/lib.sh"
check_tracing as_user
cd /var/tmp
COT_MUST_WORK=1 "$COT_TEST_BIN" --test-threads 2 --color never rootless::
