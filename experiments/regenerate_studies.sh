#!/usr/bin/env bash
# Regenerates committed study reports: each study registered, run from an empty work
# directory, reported, published and verified, one after another, with its wall time.
#
#   bash experiments/regenerate_studies.sh WORKROOT PUBLISHROOT STUDY [STUDY ...]
#
# e.g. `bash experiments/regenerate_studies.sh /tmp/studies results placement bn_batch_size`
# writes results/placement/ and results/bn_batch_size/. On a lent GPU machine, publish
# under $OUT and copy the directories into results/ here. A study that fails stops the script.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 WORKROOT PUBLISHROOT STUDY [STUDY ...]" >&2
  exit 2
fi
work=$1 publish=$2
shift 2
mkdir -p "$work"
for name in "$@"; do
  if [ -e "$work/$name" ]; then
    echo "error: $work/$name exists; regenerating starts from an empty work directory" >&2
    exit 2
  fi
  start=$(date +%s)
  python -m bnlab.study --config="configs/studies/$name.py" --workdir="$work/$name" \
      --out="$publish/$name" > "$work/$name.report.txt"
  python -m bnlab.study --config="configs/studies/$name.py" --workdir="$publish/$name" \
      --stage=verify
  echo "$name: $(( $(date +%s) - start )) s"
done
