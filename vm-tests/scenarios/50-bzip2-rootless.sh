# vm: fuse=on timeout=900
# As an unprivileged user: a memoized build of bzip2 with cot make.
. "$COT_VM_RUN/scenarios/lib.sh"
check_bzip2 as_user
