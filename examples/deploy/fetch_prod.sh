#!/usr/bin/env bash
# Fetch the model that DVC's model registry has in a stage (prod by default) into an empty folder,
# with DVC's own tools: the GTO tags say which commit, the DVC remote holds the bytes.
#   examples/deploy/fetch_prod.sh REPO_URL OUT_DIR [STAGE]
# REPO_URL: the project's git URL (or a local clone); its DVC remote must be reachable from here.
set -euo pipefail
repo=${1:?usage: fetch_prod.sh REPO_URL OUT_DIR [STAGE]}
out=${2:?usage: fetch_prod.sh REPO_URL OUT_DIR [STAGE]}
stage=${3:-prod}
if [ -e "$out" ] && [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
  echo "fetch_prod.sh: $out is not empty" >&2
  exit 2
fi
# an empty OUT_DIR goes first: `dvc artifacts get -o` puts the model inside an existing folder (OUT_DIR/serving)
if [ -d "$out" ]; then rmdir "$out"; fi
dvc artifacts get "$repo" classifier --stage "$stage" -o "$out"
echo "fetched classifier ($stage) into $out"
