# vm: fuse=on timeout=900
# As root on 6.1 (no FUSE passthrough): cot run's tracing and memoization, checked by the
# integration tests and by hand.
. "$COT_VM_RUN/scenarios/lib.sh"
check_tracing as_root
cd /var/tmp
# Left out: two tests that depend on timing, which emulation stretches past their bounds.
# concurrent_runs_share_the_store starts six clients at once, and their store server takes
# longer than cot's fixed 10 s start timeout (src/server.rs) to start;
# a_store_server_with_steady_short_clients_stays_up expects a server that exits after 2 s
# without clients to stay up for clients 0.7 s apart, which holds only while each client takes
# well under a second.
COT_MUST_WORK=1 "$COT_TEST_BIN" --test-threads 2 --color never tracing:: memo:: \
  --skip memo::concurrent_runs_share_the_store \
  --skip memo::a_store_server_with_steady_short_clients_stays_up
