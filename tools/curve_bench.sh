#!/usr/bin/env bash
# The cost of CURVE on throughput: two engines on this machine, one plain, one with CURVE (same
# settings otherwise), and `engine-ctl bench` against each in turn, ROUNDS times (ABAB...), in one run.
#   tools/curve_bench.sh [MODEL] [ROUNDS] [BENCH ARGS...]     default: demo 3 --batches 20 --batch-size 24
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-demo}; rounds=${2:-3}; shift $(( $# > 2 ? 2 : $# )) || true
args=("$@"); [ ${#args[@]} -gt 0 ] || args=(--batches 20 --batch-size 24)
ctl=.venv/bin/engine-ctl
[ -x "$ctl" ] || ./tools/dev ctl --help >/dev/null
.venv/bin/python -c "from engine.cli.demo_avatars import ensure_avatars; from pathlib import Path; ensure_avatars(Path('models'))"
work=$(mktemp -d /tmp/lse-curve-bench.XXXXXX)
trap '$ctl --config "$work/plain.toml" stop >/dev/null 2>&1 || true; $ctl --config "$work/curve.toml" stop >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
$ctl keygen server --dir "$work/keys" >/dev/null
$ctl keygen bench --dir "$work/keys" >/dev/null
mkdir -p "$work/keys/clients" && cp "$work/keys/bench.key" "$work/keys/clients/"
for kind in plain curve; do
  port=$((25000 + RANDOM % 20000))
  curve=""
  [ $kind = curve ] && curve="curve_secret_key = \"$work/keys/server.key_secret\"
curve_clients = \"$work/keys/clients\""
  cat > "$work/$kind.toml" <<TOML
models_root = "$PWD/models"
[server]
front = "tcp://127.0.0.1:$port"
run_dir = "$work/run_$kind"
instance = "cb$kind"
$curve
[client]
secret_key = "$work/keys/bench.key_secret"
[gpu]
devices = "auto"
TOML
  [ $kind = plain ] && sed -i '/^\[client\]/,/^secret_key/d' "$work/$kind.toml"
  $ctl --config "$work/$kind.toml" start --detach >/dev/null
  $ctl --config "$work/$kind.toml" load "$model" >/dev/null
done
echo "$(date -u +%Y-%m-%dT%H:%MZ) $(nproc) cores, $(uname -m); engine-ctl bench --model $model ${args[*]}"
for r in $(seq "$rounds"); do
  for kind in plain curve; do
    fps=$($ctl --config "$work/$kind.toml" bench --model "$model" "${args[@]}" | sed -n 's/^throughput \([0-9.]*\) frames.*/\1/p')
    echo "round $r  $kind  $fps frames/s"
  done
done
