#!/usr/bin/env bash
# Time-to-rollback benchmark: how long from the moment a canary turns bad until Envoy sends it
# no more users, at evaluation intervals of 1 s and 5 s, several repetitions each.
#
# Each repetition is one `sluice-demo run` (real Envoy, model servers, synthetic users at 300
# req/s, the controller in-process) on free ports: ramp 10 → 50 → 100 %, warm-up 2 s, bake 30 s
# (long enough that the 50 % stage is still running when the fault is caught); the canary's
# fault (scenario error-spike: 8 % of answers are 500) is switched on 5 s + a fraction of the
# interval after the 50 % stage is seen confirmed, so the stage already holds healthy evidence,
# as a regression mid-stage would find it. The fraction is (rep − 1)/REPS of the interval: the
# controller evaluates on a fixed tick, so without it every run would hit the same phase of
# the tick. Measured per run, from the run's summary.json:
#   detection   fault → the controller decides to roll back (audit log)
#   → envoy     decision → Envoy's last request to the canary cluster (its upstream_rq_total,
#               polled every 50 ms, so up to 50 ms late; the total is "fault → 0 %")
#   → upstream  decision → the canary server's last request arrival (exact, to within the gap
#               between two canary requests)
#   → confirm   decision → the controller sees Envoy's ECDS update counter move (audit log)
# and the median and max of each over the repetitions. Not a timed test: run it by hand and
# copy the table into docs/benchmarks.md.
#
#   scripts/bench-rollback.sh                     # 7 repetitions at 1 s and at 5 s (~11 min)
#   REPS=3 INTERVALS="1s" scripts/bench-rollback.sh
#   SCENARIO=latency WEIGHT=10 scripts/bench-rollback.sh    # another fault, another stage
#
# Output is also saved under target/bench/.
source "$(dirname "${BASH_SOURCE[0]}")/lib/bench.sh"
REPS="${REPS:-7}"
INTERVALS="${INTERVALS:-1s 5s}"
SCENARIO="${SCENARIO:-error-spike}"
WEIGHT="${WEIGHT:-50}"

bench_build sluice-filter -- sluice-demo sluice-demo
bench_out rollback
runs="$TARGET/bench/rollback-$STAMP"
mkdir -p "$runs"
section "run (results in $OUT, runs in $runs/)"
bench_header "scripts/bench-rollback.sh: scenario $SCENARIO, fault 5 s + (rep-1)/$REPS interval into the $WEIGHT % stage, $REPS repetitions per interval"

free_ports() {
  python3 - <<'EOF'
import socket
socks = []
for _ in range(6):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(",".join(str(s.getsockname()[1]) for s in socks))
EOF
}

for interval in $INTERVALS; do
  for rep in $(seq 1 "$REPS"); do
    dir="$runs/$interval-$rep"
    delay_ms="$(python3 -c 'import sys
iv = sys.argv[1]
secs = float(iv[:-2]) / 1000 if iv.endswith("ms") else float(iv.rstrip("s"))
print(round(5000 + 1000 * secs * (int(sys.argv[2]) - 1) / int(sys.argv[3])))' "$interval" "$rep" "$REPS")"
    section "interval $interval, repetition $rep/$REPS"
    status=0
    "$BIN" run --scenario "$SCENARIO" --seed "$rep" --ports "$(free_ports)" --out "$dir" \
      --stages "10,$WEIGHT,100" --warmup 2s --bake 30s --interval "$interval" \
      --fault-at-weight "$WEIGHT" --fault-delay "${delay_ms}ms" --tail 1s --duration-limit 120s \
      >"$dir.log" 2>&1 || status=$?
    grep -E '^(result|time to rollback|  = detection)' "$dir.log" >&2 || tail -n 20 "$dir.log" >&2
    [[ $status -eq 0 ]] || echo "  (exit $status: not as expected; see $dir.log)" >&2
  done
done

python3 - "$runs" "$INTERVALS" <<'EOF' | tee -a "$OUT"
import json, os, statistics, sys
runs, intervals = sys.argv[1], sys.argv[2].split()
cols = [("detection_secs", "detection"), ("decision_to_envoy_secs", "→ envoy"),
        ("decision_to_upstream_secs", "→ upstream"),
        ("fault_to_zero_traffic_secs", "fault → 0 %"), ("decision_to_confirmation_secs", "→ confirm")]
print()
print("| interval | runs | rolled back | " + " | ".join(f"{c} median / max (s)" for _, c in cols) + " |")
print("|---|---:|---:|" + "---:|" * len(cols))
per_run = []
for iv in intervals:
    rows = []
    dirs = sorted(d for d in os.listdir(runs) if d.startswith(iv + "-") and os.path.isdir(os.path.join(runs, d)))
    for d in dirs:
        try:
            s = json.load(open(os.path.join(runs, d, "summary.json")))
        except OSError:
            continue
        r = s.get("rollback") or {}
        if r.get("upstream_last_request_at") is not None and r.get("decided_at") is not None:
            r["decision_to_upstream_secs"] = r["upstream_last_request_at"] - r["decided_at"]
        rows.append(r)
        per_run.append((d, s.get("final_phase"), r, s.get("final_reason", "")))
    ok = [r for r in rows if r.get("fault_to_zero_traffic_secs") is not None]
    cells = []
    for key, _ in cols:
        xs = [r[key] for r in ok if r.get(key) is not None]
        cells.append(f"{statistics.median(xs):.2f} / {max(xs):.2f}" if xs else "–")
    print(f"| {iv} | {len(dirs)} | {len(ok)} | " + " | ".join(cells) + " |")
print()
print("| run | end | detection | → envoy | → upstream | fault → 0 % | → confirm | reason |")
print("|---|---|---:|---:|---:|---:|---:|---|")
for d, phase, r, reason in per_run:
    f = lambda k: "–" if r.get(k) is None else f"{r[k]:.2f}"
    print(f"| {d} | {phase} | {f('detection_secs')} | {f('decision_to_envoy_secs')} | {f('decision_to_upstream_secs')} | "
          f"{f('fault_to_zero_traffic_secs')} | {f('decision_to_confirmation_secs')} | {(reason or '')[:60]} |")
EOF
