#!/usr/bin/env bash
# The Fashion-MNIST comparison of docs/claims.md (12 epochs, 3 seeds, five attacks), run as
# single-thread lanes on a small machine, with its finished runs kept in the repository.
#
#   benchmarks/fmnist_table.sh restore          # docs/results/fmnist/runs -> results/fmnist/runs
#   benchmarks/fmnist_table.sh lane NAME SPEC:SEED ...   # train + evaluate these runs, in order
#   benchmarks/fmnist_table.sh save             # finished runs (and resume points) -> docs/
#   benchmarks/fmnist_table.sh tables           # the compare over every run: docs/results/fmnist
#
# A lane is one `experiment compare` per run, one thread; two lanes on two cores train disjoint
# runs into the same results/fmnist, whose cache (compare_eval.json, keyed by the evaluation
# settings and the checkpoint's SHA-256) lets `tables` evaluate nothing twice. `save` copies of
# each run only what reuse needs (config, summary, metrics, best checkpoint, cached
# evaluation); an unfinished run also keeps its last resume checkpoint, so a later `restore`
# and `lane` resume it. SPEC is a model spec (name[:key=value...]); SEED an integer.
# RESULTS (default results/fmnist) and SAVED (default docs/results/fmnist) move the two trees;
# MODELS and SEEDS (comma lists) narrow what `tables` compares.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-results/fmnist}
SAVED=${SAVED:-docs/results/fmnist}
MODELS=${MODELS:-euclidean_resnet20,hybrid_resnet20,hybrid_resnet20:hybrid_head=fc,poincare_resnet20,poincare_resnet20_nf,poincare_resnet20:init=identity-compensated}
SEEDS=${SEEDS:-0,1,2}
# the recipe and the evaluation of docs/claims.md
compare() {
  python -m poincare_resnet experiment compare --dataset fashion-mnist --epochs 12 \
    --batch-size 128 --lr 2e-3 --threads "${THREADS:-1}" --out "$RESULTS" "$@" \
    --set attacks=fgsm,pgd,pgd-margin,square,angular pgd_steps=10 restarts=2 queries=200 \
    attack_limit=500 models="$MODEL_LIST"
}
copy_run() {  # copy_run SRC DST: the files reuse needs (+ the last resume point if unfinished)
  local src=$1 dst=$2 f
  mkdir -p "$dst"
  for f in config.json summary.json metrics.jsonl best.safetensors best.json compare_eval.json; do
    if [ -f "$src/$f" ]; then cp -p "$src/$f" "$dst/"; fi
  done
  if [ ! -f "$src/summary.json" ] && [ -d "$src/checkpoints" ]; then
    local last
    last=$(find "$src/checkpoints" -name 'ckpt-*.safetensors' | sort | tail -n 1)
    if [ -n "$last" ]; then
      rm -rf "$dst/checkpoints"
      mkdir -p "$dst/checkpoints"
      cp -p "$last" "${last%.safetensors}.json" "$dst/checkpoints/"
    fi
  fi
}
case ${1:-} in
  restore)
    for run in "$SAVED"/runs/*/; do
      [ -d "$run" ] || continue
      name=$(basename "$run")
      if [ -e "$RESULTS/runs/$name" ]; then echo "kept $RESULTS/runs/$name"; continue; fi
      copy_run "$run" "$RESULTS/runs/$name"  # with its resume point, if unfinished
      echo "restored $name"
    done ;;
  save)
    for run in "$RESULTS"/runs/*/; do
      [ -d "$run" ] || continue
      name=$(basename "$run")
      copy_run "$run" "$SAVED/runs/$name"
      # a finished run needs no resume point
      if [ -f "$run/summary.json" ]; then rm -rf "$SAVED/runs/$name/checkpoints"; fi
      echo "saved $name"
    done ;;
  lane)
    name=$2; shift 2
    for job in "$@"; do
      MODEL_LIST=${job%:*}
      echo "=== $(date -u +%FT%TZ) start $job" >> "$RESULTS-lane-$name.log"
      rc=0
      OMP_NUM_THREADS=1 compare --seeds "${job##*:}" >> "$RESULTS-lane-$name.log" 2>&1 || rc=$?
      echo "=== $(date -u +%FT%TZ) end $job rc=$rc" >> "$RESULTS-lane-$name.log"
    done ;;
  tables)
    MODEL_LIST=$MODELS
    compare --seeds "$SEEDS"
    mkdir -p "$SAVED"
    cp -p "$RESULTS"/compare*.{csv,md,png,json} "$SAVED/" ;;
  *)
    sed -n '2,17p' "$0"; exit 2 ;;
esac
