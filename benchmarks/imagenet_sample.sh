#!/usr/bin/env bash
# The loader and conversion benchmark from a clean clone: the 500 real ImageNet
# JPEGs of ../shared with ImageNet+-size records (400 reinforcements per image),
# then `ffcv-dr bench` (extra arguments go to it, e.g. --workers 8).
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${SHARED:-../shared}"
mkdir -p out
./run.sh convert "$shared/data/imagenet-sample/train" out/imagenet-sample-ns400.beton \
    --mldr "$shared/fixtures/mldr-randaug-ns400/reinforced_data"
./run.sh bench out/imagenet-sample-ns400.beton --out out/bench "$@"
