#!/usr/bin/env bash
# Where the wgpu backend's device time goes, per kernel and shape, on a GPU machine:
# bench_train with FEDQUIC_WGPU_PROFILE (timestamp queries around every dispatch; see
# train/src/backend/wgpu/profile.rs) for the issue's two target rows, then the same
# rows unprofiled (skipped with PROFILE_ONLY=1). Needs .gpu/bench_train and .gl/ from
# bench/gpu/prepare.sh; about a minute. Logs go to $OUT (./gpu-out elsewhere): every
# profile in profiles.txt, the unprofiled rows in bench_wgpu.txt.
set -u
source "$(dirname "$0")/env.sh"
B=.gpu/bench_train
find_adapter "$OUT/probe.txt"
grep -m1 backend "$OUT/probe.txt"
PROFILES=$(mktemp -d)
for job in "cnn:mnist 64 cnn_train64" "cnn:mnist 256 cnn_train256" "mlp:784-200-200-10 256 mlp_train256" "mlp:784-200-200-10 10 mlp_train10"; do
    set -- $job
    FEDQUIC_WGPU_PROFILE="$PROFILES/$3.txt" timeout 60 "$B" --backend wgpu --models "$1" \
        --batches "$2" --eval-batches 256 --seconds 0.3 > /dev/null 2>&1
    { echo "== $3"; cat "$PROFILES/$3.txt"; } >> "$OUT/profiles.txt"
    echo "== $3"; head -n 22 "$PROFILES/$3.txt"
done
[ "${PROFILE_ONLY:-}" = 1 ] && exit 0
echo "== unprofiled"
timeout 120 "$B" --backend wgpu --batches 10,64,256 --eval-batches 64,256 --seconds 1 2>&1 | tee "$OUT/bench_wgpu.txt"
