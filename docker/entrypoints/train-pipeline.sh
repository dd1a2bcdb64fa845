#!/bin/sh
# One-shot offline job: synthetic data -> train -> export to the registry -> feature snapshot.
#
# Runs in the train image (docker/train.Dockerfile) from /app, where models/ data/ runs/ are
# volumes shared with the other jobs. Idempotent: if the registry already serves a version of
# MTRANK_MODEL and a snapshot exists for it, nothing is retrained (set MTRANK_RETRAIN=1 to force),
# so `docker compose up` after the first time starts in seconds.
set -eu

model="${MTRANK_MODEL:-ecommerce}"
root="${MTRANK_MODEL_DIR:-models}"
config="${MTRANK_TRAIN_CONFIG:-training/configs/ecommerce_mmoe.yaml}"
# Must be where the dataset spec of the config points (paths there are relative to the YAML:
# training/configs/../../data/ecommerce).
data="${MTRANK_DATA_DIR:-data/ecommerce}"
runs="${MTRANK_RUNS_DIR:-runs}"
impressions="${MTRANK_SYNTH_IMPRESSIONS:-200000}"
seed="${MTRANK_SYNTH_SEED:-7}"

log() { echo "[train-pipeline] $*" >&2; }

if [ "${MTRANK_RETRAIN:-0}" != 1 ] && [ -s "$root/$model/current" ] \
    && [ -n "$(find "$root/$model/snapshots" -name '*.npz' 2>/dev/null | head -n 1)" ]; then
    log "model $model already serves version $(cat "$root/$model/current"); MTRANK_RETRAIN=1 retrains"
    exit 0
fi

log "synthesising $impressions impressions (seed $seed) into $data"
mtrank synth ecommerce --out "$data" --impressions "$impressions" --seed "$seed"

log "training with $config"
mkdir -p "$runs"
marker="$(mktemp)"
mtrank train --config "$config"
# The checkpoint this run wrote: the newest best.pt (else *.pt) under runs/ created after the
# marker. An explicit MTRANK_CHECKPOINT wins.
newest() { find "$runs" -name "$1" -newer "$marker" -exec ls -t {} + | head -n 1; }
checkpoint="${MTRANK_CHECKPOINT:-$(newest best.pt)}"
checkpoint="${checkpoint:-$(newest '*.pt')}"
rm -f "$marker"
if [ -z "$checkpoint" ]; then
    log "no checkpoint (*.pt) written under $runs by this run; set MTRANK_CHECKPOINT"
    exit 1
fi

log "exporting $checkpoint as $model"
mtrank export --checkpoint "$checkpoint" --name "$model" --root "$root"

log "building the feature snapshot"
mtrank features --root "$root" build --model "$model" \
    --users "$data/users.parquet" --items "$data/items.parquet"
log "done"
