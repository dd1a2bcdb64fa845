#!/bin/sh
# Entry point of the service image: start `mtrank serve` with a clean metrics directory.
#
# prometheus_client's multiprocess mode keeps one file per worker pid in
# PROMETHEUS_MULTIPROC_DIR and sums them on every scrape. Files left by a previous run would be
# summed too (counters that never reset, a gauge for a model version that is gone), so the
# directory is emptied before uvicorn forks its workers. Extra arguments go to `mtrank serve`.
set -eu

dir="${PROMETHEUS_MULTIPROC_DIR:-}"
if [ -n "$dir" ]; then
    mkdir -p "$dir"
    find "$dir" -mindepth 1 -delete
fi

exec mtrank serve "$@"
