#!/usr/bin/env bash
# Unpack the packages/ tree of a commit into ./ab_base (git-ignored) for gpu_check.sh's AB_BASE
# arm: a same-run A/B against code that no switch can bring back (a kernel changed in place).
#   bash scripts/ab_base.sh HEAD~1 && <device call> AB_BASE=ab_base bash scripts/gpu_check.sh ab
#   (carry ab_base and wheelhouse)
set -euo pipefail
cd "$(dirname "$0")/.."
commit="${1:?usage: bash scripts/ab_base.sh <commit>}"
rm -rf ab_base
mkdir ab_base
git archive "$commit" packages | tar -x -C ab_base
git rev-parse "$commit" > ab_base/COMMIT
echo "ab_base: packages/ of $(cat ab_base/COMMIT) ($(du -sh ab_base | cut -f1))"
