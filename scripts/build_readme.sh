#!/usr/bin/env bash
# README.md is assembled from the per-part sources in docs/readme/ (edit those, then run this).
set -euo pipefail
cd "$(dirname "$0")/.."
parts=(00_head foundation rome_memit speed stats evaluation ftw mend ecosystem multigpu reliability reproduce 90_tests)
files=()
for p in "${parts[@]}"; do
  [ -f "docs/readme/$p.md" ] && files+=("docs/readme/$p.md")
done
for f in "${files[@]}"; do cat "$f"; echo; done | sed -e '$ { /^$/d }' > README.md
