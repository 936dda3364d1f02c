# vm: fuse=on timeout=2400
# The benchmark (vm-tests/bench runs it with `vm-tests/run --release bench`, and the same
# script on the host): not one of the tests, run only when named.
"$COT_VM_RUN/measure" "$COT" "$BZIP2_SRC" "$COT_VM_RUN/interleave.py" \
  "${COT_BENCH_THUNK_ROUNDS:-20}" "${COT_BENCH_BUILD_ROUNDS:-3}"
