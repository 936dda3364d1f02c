# vm: fuse=on timeout=180
# user.max_user_namespaces = 0: rootless cot refuses with its message; cot as root, which
# needs no user namespace, still runs.
. "$COT_VM_RUN/scenarios/lib.sh"
echo 0 >/proc/sys/user/max_user_namespaces
message='user namespaces are disabled (sysctl user.max_user_namespaces = 0); enable them'
expect_refusal as_user "$message" "$COT" run --
expect_refusal as_root "$message" "$COT" run --rootless --
p=/var/tmp/root
fresh_dir as_root "$p"
(cd "$p" && "$COT" run -- sh -c 'echo ran > marker') || fail "cot as root did not run"
[ "$(cat "$p/marker")" = ran ] || fail "cot as root did not commit"
echo "as root: ran and committed"
