# vm: fuse=on timeout=900
# As root on 6.1: a memoized build of bzip2 with cot make.
. "$COT_VM_RUN/scenarios/lib.sh"
check_bzip2 as_root
