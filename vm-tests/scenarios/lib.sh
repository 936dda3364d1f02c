# Helpers for the scenarios (sourced). A scenario runs with `bash -euo pipefail` in the guest,
# as root, in /var/tmp (the host's, under the guest's overlay: each scenario makes its own
# directories there), with an empty /tmp. The runner's environment: COT (cot, with
# cot-store-server beside it, where every user can run them), COT_TEST_BIN (cot's integration
# tests), BZIP2_SRC (bzip2 1.0.8's sources), BZIP2_BUILD and BZIP2_PLAIN_SUMS (see
# check_bzip2), COT_VM_RUN (the run directory). A scenario passes when it exits 0, is skipped
# when it exits 77, and fails otherwise.

# The unprivileged user of the rootless scenarios.
VM_USER=cotvm

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

ensure_user() {
  id "$VM_USER" >/dev/null 2>&1 || useradd --create-home --shell /bin/sh "$VM_USER"
}

# Runs a command as the unprivileged user, in its home's environment.
as_user() {
  ensure_user
  setpriv --reuid="$VM_USER" --regid="$VM_USER" --init-groups -- \
    env HOME="/home/$VM_USER" USER="$VM_USER" "$@"
}

# as_root CMD...: the same shape as as_user, for functions that take either.
as_root() { "$@"; }

# A directory the given runner (as_root or as_user) owns, made anew.
fresh_dir() {
  rm -rf "$2"
  mkdir -p "$2"
  if [ "$1" = as_user ]; then
    ensure_user
    chown "$VM_USER:$VM_USER" "$2"
  fi
}

# expect_refusal RUNNER MESSAGE CMD...: CMD must exit 125 (cot itself failed) with MESSAGE in
# its stderr, and run nothing.
expect_refusal() {
  runner=$1 message=$2
  shift 2
  dir=/var/tmp/refusal
  fresh_dir "$runner" "$dir"
  status=0
  (cd "$dir" && "$runner" "$@" sh -c 'echo ran > marker') >"$dir.out" 2>"$dir.err" || status=$?
  echo "$runner $*: exit $status, stderr: $(cat "$dir.err")"
  [ "$status" -eq 125 ] || fail "expected exit status 125, got $status"
  grep -qF -- "$message" "$dir.err" || fail "expected the message: $message"
  [ ! -e "$dir/marker" ] || fail "the command ran"
}

# The trace (JSON lines) of the last run has an access of this kind to this path.
trace_has() {
  grep -qF "{\"kind\":\"$2\",\"path\":\"$3\"" "$1" || {
    cat "$1" >&2
    fail "no $2 of $3 in the trace $1"
  }
}

# check_tracing RUNNER: cot run traces reads, listings, absent paths and writes, serves file
# data from userspace on this kernel (no FUSE passthrough before 6.9), commits the outputs, and
# a second run with unchanged inputs is a hit that replays the output without running.
check_tracing() {
  runner=$1
  p=/var/tmp/tracing-$runner
  fresh_dir "$runner" "$p"
  cd "$p"
  $runner sh -c 'mkdir .cot dir && echo hello > in && touch dir/a dir/b'
  script='cat in; ls dir > listing; test -e missing || echo absent; echo "$(cat in) world" > out'
  $runner "$COT" run -v --trace-out "$p.trace" -- sh -c "$script" >"$p.out" 2>"$p.err" ||
    fail "cot run failed: $(cat "$p.err")"
  cat "$p.err"
  grep -q 'file data served by userspace' "$p.err" || fail "expected the userspace data path"
  [ "$(cat "$p.out")" = "$(printf 'hello\nabsent')" ] || fail "output: $(cat "$p.out")"
  [ "$(cat out)" = "hello world" ] || fail "out was not committed"
  [ "$(cat listing)" = "$(printf 'a\nb')" ] || fail "listing: $(cat listing)"
  trace_has "$p.trace" read "$p/in"
  trace_has "$p.trace" readdir "$p/dir"
  trace_has "$p.trace" absent "$p/missing"
  trace_has "$p.trace" write "$p/out"
  trace_has "$p.trace" write "$p/listing"
  trace_has "$p.trace" read "$(readlink -f "$(command -v ls)")"
  echo "traced: $(wc -l <"$p.trace") accesses"

  rm out
  $runner "$COT" run --explain -- sh -c "$script" >"$p.out" 2>"$p.err" || fail "$(cat "$p.err")"
  grep -q '^cot: cached: ' "$p.err" || fail "second run was not a hit: $(cat "$p.err")"
  [ "$(cat "$p.out")" = "$(printf 'hello\nabsent')" ] || fail "output not replayed"
  [ "$(cat out)" = "hello world" ] || fail "out was not restored"
  echo "second run: $(cat "$p.err")"

  $runner sh -c 'echo bye > in'
  $runner "$COT" run --explain -- sh -c "$script" >"$p.out" 2>"$p.err" || fail "$(cat "$p.err")"
  grep -q '^cot: ran: .*in changed' "$p.err" || fail "a changed input did not run: $(cat "$p.err")"
  [ "$(cat out)" = "bye world" ] || fail "out: $(cat out)"
  echo "after a change: $(cat "$p.err")"
  cd /
}

# The states of a `cot make --report` file's thunks: "THUNKS RAN".
report_counts() {
  python3 -c 'import json, sys
thunks = json.load(open(sys.argv[1]))["thunks"]
print(len(thunks), sum(1 for t in thunks if t["ran"]))' "$1"
}

# Seconds since boot, for the scenarios' own account of where their time went.
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk "BEGIN { printf \"%.1f s\", $(now) - $1 }"; }

# Two `sha256sum` listings name the same files with the same contents.
same_sums() {
  diff -u <(LC_ALL=C sort -k2 "$1") <(LC_ALL=C sort -k2 "$2")
}

# check_bzip2 RUNNER: a clean `cot make -j2` of bzip2 1.0.8 gives the files plain make gives,
# byte for byte, and a second `cot make -j2` runs nothing. Plain `make -j2` ran on the host
# before the boot, with the same compiler (the guest runs the host's) at the same path,
# BZIP2_BUILD, and left the sums of its files in BZIP2_PLAIN_SUMS.
check_bzip2() {
  runner=$1
  b=$BZIP2_BUILD
  logs=/var/tmp/bzip2-$runner
  fresh_dir "$runner" "$logs"
  fresh_dir "$runner" "$b"
  $runner cp -r "$BZIP2_SRC/." "$b/"
  $runner mkdir "$b/.cot"
  t=$(now)
  (cd "$b" && $runner "$COT" make -j2 --report "$logs/1.json") >"$logs/1.log" 2>&1 || {
    cat "$logs/1.log"
    fail "the first cot make failed"
  }
  took=$(since "$t")
  (cd "$b" && find . -path ./.cot -prune -o -type f -print | sort | xargs sha256sum) >"$logs/cot.sums"
  same_sums "$BZIP2_PLAIN_SUMS" "$logs/cot.sums" || fail "cot make's files differ from plain make's"
  set -- $(report_counts "$logs/1.json")
  echo "first cot make -j2: $took, $1 thunks, $2 ran; $(wc -l <"$logs/cot.sums") files, the same as plain make's"
  [ "$1" -gt 10 ] && [ "$2" -eq "$1" ] || fail "expected every thunk of the first build to run"
  first=$1

  t=$(now)
  (cd "$b" && $runner "$COT" make -j2 --report "$logs/2.json") >"$logs/2.log" 2>&1 || {
    cat "$logs/2.log"
    fail "the second cot make failed"
  }
  took=$(since "$t")
  set -- $(report_counts "$logs/2.json")
  echo "second cot make -j2: $took, $1 thunks, $2 ran: $(tail -n 1 "$logs/2.log")"
  [ "$1" -eq "$first" ] && [ "$2" -eq 0 ] || fail "expected the second build to run nothing"
  (cd "$b" && find . -path ./.cot -prune -o -type f -print | sort | xargs sha256sum) >"$logs/cot2.sums"
  same_sums "$BZIP2_PLAIN_SUMS" "$logs/cot2.sums" || fail "the files changed"
}
