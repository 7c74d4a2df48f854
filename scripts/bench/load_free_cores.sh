#!/bin/bash
# The load benchmark with the server and the load generator on separate cores
# (BENCHMARKS.md, "On a machine with free cores"). Needs 16 cores, taskset,
# and `cargo build --release --bin molora --example load_gen`; OUT names a
# folder for the logs (default /tmp/load). S1, S2, L: the server's cores in
# the two runs and the load generator's; LOADARGS: extra load_gen flags.
set -u
OUT=${OUT:-/tmp/load}; mkdir -p "$OUT"
nproc; lscpu | grep -E "Model name|^CPU\(s\)|Thread|MHz" | head -5
up() { for i in $(seq 120); do (exec 3<>/dev/tcp/127.0.0.1/8080) 2>/dev/null && return 0; sleep 0.5; done; return 1; }
run() { # $1 = server cores, $2 = load-generator cores, $3 = label
  taskset -c $1 ${BIN:-target/release}/molora serve --model models/demo --bind 127.0.0.1:8080 --data-dir "$OUT/data_$3" > $OUT/server_$3.log 2>&1 &
  local sp=$!
  up || { echo "server did not start"; tail -20 $OUT/server_$3.log; return 1; }
  echo "== server on cores $1, load_gen on cores $2 ($3)"
  local t0=$SECONDS
  taskset -c $2 ${BIN:-target/release}/examples/load_gen --url http://127.0.0.1:8080 ${LOADARGS:-} | tee $OUT/load_$3.txt
  echo "load_gen took $((SECONDS - t0)) s"
  kill $sp; wait $sp 2>/dev/null
}
run ${S1:-0-7} ${L:-8-15} server8
run ${S2:-0-1} ${L:-8-15} server2
