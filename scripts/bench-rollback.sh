#!/usr/bin/env bash
# Time-to-rollback benchmark: how long from the moment a canary turns bad until Envoy sends it
# no more users, by the controller alone and with the filter's breaker, several repetitions each.
#
# Each repetition is one `sluice-demo run` (real Envoy, model servers, synthetic users at 300
# req/s, the controller in-process) on free ports: ramp $STAGES (default 5 → 10 → 100 %), warm-up
# 2 s, bake 30 s (the stage at $WEIGHT % is still running when the fault is caught); the canary's
# fault (scenario error-spike with $ERROR_RATE of its answers 500, default half) is switched on
# 5 s + a fraction of the interval after the $WEIGHT % stage is seen confirmed, so the stage
# already holds healthy evidence, as a regression mid-stage would find it. The fraction is
# (rep − 1)/REPS of the interval: the controller evaluates on a fixed tick, so without it every
# run would hit the same phase of the tick. Cases ($CASES):
#   controller  the experiment has no breaker: the controller's judge decides, then pushes 0 %
#   breaker     the experiment has the filter's breaker (window 10 s, min_requests $BREAKER_MIN,
#               max_error_rate $BREAKER_RATE, ratio 3): the filter takes the canary out by itself
# Measured per run, from the run's summary.json:
#   detection   fault → the controller decides to roll back (audit log; in the breaker case
#               the decision follows the data plane's trip)
#   → envoy     decision → Envoy's last request to the canary cluster (its upstream_rq_total,
#               polled every 50 ms, so up to 50 ms late)
#   → upstream  decision → the canary server's last request arrival (exact, to within the gap
#               between two canary requests)
#   fault → 0 % fault → Envoy's last request to the canary (the 50 ms poll)
#   fault → last  fault → the canary server's last request arrival (its own clock)
#   → confirm   decision → the controller sees Envoy's ECDS update counter move (audit log)
# and the median and max of each over the repetitions. Not a timed test: run it by hand and
# copy the table into docs/benchmarks.md.
#
#   scripts/bench-rollback.sh                     # 7 repetitions per case at 1 s (~10 min)
#   REPS=3 CASES=breaker scripts/bench-rollback.sh
#   CASES=controller WEIGHT=50 STAGES=10,50,100 ERROR_RATE=0.08 INTERVALS="1s 5s" \
#     scripts/bench-rollback.sh                   # controller only, 8 % errors at the 50 % stage
#
# Output is also saved under target/bench/.
source "$(dirname "${BASH_SOURCE[0]}")/lib/bench.sh"
REPS="${REPS:-7}"
INTERVALS="${INTERVALS:-1s}"
SCENARIO="${SCENARIO:-error-spike}"
WEIGHT="${WEIGHT:-10}"
STAGES="${STAGES:-5,$WEIGHT,100}"
ERROR_RATE="${ERROR_RATE:-0.5}"
CASES="${CASES:-controller breaker}"
BREAKER_MIN="${BREAKER_MIN:-20}"
BREAKER_RATE="${BREAKER_RATE:-0.05}"

bench_build sluice-filter -- sluice-demo sluice-demo
bench_out rollback
runs="$TARGET/bench/rollback-$STAMP"
mkdir -p "$runs"
section "run (results in $OUT, runs in $runs/)"
bench_header "scripts/bench-rollback.sh: scenario $SCENARIO (error rate $ERROR_RATE), stages $STAGES, fault 5 s + (rep-1)/$REPS interval into the $WEIGHT % stage, cases $CASES (breaker: min_requests $BREAKER_MIN, max_error_rate $BREAKER_RATE), $REPS repetitions per case and interval"

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

for case in $CASES; do
  case "$case" in
    controller) flags=(--no-breaker) ;;
    breaker) flags=(--breaker-min-requests "$BREAKER_MIN" --breaker-max-error-rate "$BREAKER_RATE") ;;
    *) echo "unknown case $case (controller, breaker)" >&2; exit 2 ;;
  esac
  for interval in $INTERVALS; do
    for rep in $(seq 1 "$REPS"); do
      dir="$runs/$case-$interval-$rep"
      delay_ms="$(python3 -c 'import sys
iv = sys.argv[1]
secs = float(iv[:-2]) / 1000 if iv.endswith("ms") else float(iv.rstrip("s"))
print(round(5000 + 1000 * secs * (int(sys.argv[2]) - 1) / int(sys.argv[3])))' "$interval" "$rep" "$REPS")"
      section "$case, interval $interval, repetition $rep/$REPS"
      status=0
      "$BIN" run --scenario "$SCENARIO" --seed "$rep" --ports "$(free_ports)" --out "$dir" \
        --stages "$STAGES" --warmup 2s --bake 30s --interval "$interval" --error-rate "$ERROR_RATE" \
        --fault-at-weight "$WEIGHT" --fault-delay "${delay_ms}ms" --tail 1s --duration-limit 150s \
        "${flags[@]}" >"$dir.log" 2>&1 || status=$?
      grep -E '^(result|time to rollback|  = )' "$dir.log" >&2 || tail -n 20 "$dir.log" >&2
      [[ $status -eq 0 ]] || echo "  (exit $status: not as expected; see $dir.log)" >&2
    done
  done
done

python3 - "$runs" "$INTERVALS" "$CASES" <<'EOF' | tee -a "$OUT"
import json, os, statistics, sys
runs, intervals, cases = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
cols = [("detection_secs", "detection"), ("decision_to_envoy_secs", "→ envoy"),
        ("decision_to_upstream_secs", "→ upstream"),
        ("fault_to_zero_traffic_secs", "fault → 0 %"), ("fault_to_upstream_secs", "fault → last"),
        ("decision_to_confirmation_secs", "→ confirm")]
print()
print("| case | interval | runs | rolled back | by the breaker | " + " | ".join(f"{c} median / max (s)" for _, c in cols) + " |")
print("|---|---|---:|---:|---:|" + "---:|" * len(cols))
per_run = []
for case in cases:
    for iv in intervals:
        rows = []
        prefix = f"{case}-{iv}-"
        dirs = sorted(d for d in os.listdir(runs) if d.startswith(prefix) and os.path.isdir(os.path.join(runs, d)))
        for d in dirs:
            try:
                s = json.load(open(os.path.join(runs, d, "summary.json")))
            except OSError:
                continue
            r = s.get("rollback") or {}
            if r.get("upstream_last_request_at") is not None:
                if r.get("decided_at") is not None:
                    r["decision_to_upstream_secs"] = r["upstream_last_request_at"] - r["decided_at"]
                r["fault_to_upstream_secs"] = r["upstream_last_request_at"] - r["fault_at"]
            rows.append(r)
            per_run.append((d, s.get("final_phase"), r, s.get("final_reason", "")))
        ok = [r for r in rows if r.get("fault_to_zero_traffic_secs") is not None]
        by_breaker = sum(1 for r in ok if r.get("cause") == "breaker")
        cells = []
        for key, _ in cols:
            xs = [r[key] for r in ok if r.get(key) is not None]
            cells.append(f"{statistics.median(xs):.2f} / {max(xs):.2f}" if xs else "–")
        print(f"| {case} | {iv} | {len(dirs)} | {len(ok)} | {by_breaker} | " + " | ".join(cells) + " |")
print()
print("| run | end | cause | detection | → envoy | → upstream | fault → 0 % | fault → last | → confirm | reason |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
for d, phase, r, reason in per_run:
    f = lambda k: "–" if r.get(k) is None else f"{r[k]:.2f}"
    print(f"| {d} | {phase} | {r.get('cause') or '–'} | {f('detection_secs')} | {f('decision_to_envoy_secs')} | {f('decision_to_upstream_secs')} | "
          f"{f('fault_to_zero_traffic_secs')} | {f('fault_to_upstream_secs')} | {f('decision_to_confirmation_secs')} | {(reason or '')[:60]} |")
EOF
