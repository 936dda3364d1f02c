# vm: fuse=off timeout=180
# No fuse module loaded and no /dev/fuse: cot refuses, as root and rootless, with its message.
. "$COT_VM_RUN/scenarios/lib.sh"
[ ! -e /dev/fuse ] || fail "/dev/fuse exists"
! grep -qw fuse /proc/filesystems || fail "the fuse module is loaded"
message='/dev/fuse is missing; load the fuse module (modprobe fuse)'
expect_refusal as_root "$message" "$COT" run --
expect_refusal as_root "$message" "$COT" run --rootless --
expect_refusal as_user "$message" "$COT" run --
