#!/usr/bin/env bash
# README.md is assembled from the per-part sources in docs/readme/ (edit those, then run this).
set -euo pipefail
cd "$(dirname "$0")/.."
cat docs/readme/00_head.md docs/readme/foundation.md docs/readme/rome_memit.md docs/readme/stats.md \
    docs/readme/evaluation.md docs/readme/ftw.md docs/readme/mend.md docs/readme/90_tests.md > README.md
