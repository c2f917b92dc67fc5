#!/usr/bin/env bash
# Build .variants/ for a GEMM A/B device call (gemm_ab.py via device_check.sh's AB_VARIANTS):
# one copy of the include tree per patch in benchmarks/experiments/ (named after the patch),
# plus `head` (the tree as it is). Prints the AB_VARIANTS value to pass.
#   bash benchmarks/make_variants.sh [PATCH_NAME ...]     # default: every patch
set -euo pipefail
cd "$(dirname "$0")/.."
include=moe_fp8/gemm/include
rm -rf .variants && mkdir -p .variants
cp -r "$include" .variants/head
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  shopt -s nullglob  # no patches pending: head alone
  for p in benchmarks/experiments/*.patch; do names+=("$(basename "$p" .patch)"); done
fi
spec="head=.variants/head"
for name in "${names[@]}"; do
  patch_file="benchmarks/experiments/$name.patch"
  cp -r "$include" ".variants/$name"
  # the patches are made against the repository root (a/moe_fp8/gemm/include/...): strip 4 levels
  patch -s -d ".variants/$name" -p4 < "$patch_file"
  spec="$spec $name=.variants/$name"
done
echo "$spec"
