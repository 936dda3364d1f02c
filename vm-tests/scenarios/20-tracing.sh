# vm: fuse=on timeout=900
# As root on 6.1 (no FUSE passthrough): cot run's tracing and memoization, checked by the
# integration tests and by hand.
. "$COT_VM_RUN/scenarios/lib.sh"
check_tracing as_root
cd /var/tmp
# Left out: a_store_server_with_steady_short_clients_stays_up expects a server that exits
# after 2 s without clients to stay up for clients 0.7 s apart, which holds only while each
# client takes well under a second, and emulation stretches them past that.
COT_MUST_WORK=1 "$COT_TEST_BIN" --test-threads 2 --color never tracing:: memo:: \
  --skip memo::a_store_server_with_steady_short_clients_stays_up
