#!/usr/bin/env bash
# One-time set-up on a fresh Debian machine (root): the real data sources, then clipkit itself.
# Idempotent: what is already installed is skipped. Usage: bash tools/setup.sh [pip extras, e.g. test]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

debs=(fonts-noto-color-emoji unicode-data unicode-cldr-core dataset-fashion-mnist openclipart-svg libcairo2)
# The search page's browser test (tests/test_serve.py): a real chromium driven by selenium.
[[ ",${extras}," == *",test,"* ]] && debs+=(chromium chromium-driver)
missing=()
for p in "${debs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing Debian data packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

spec="."
[ -n "$extras" ] && spec=".[${extras}]"
if ! python3 -m pip show -q clipkit >/dev/null 2>&1 || ! command -v clipkit >/dev/null || [ -n "$extras" ]; then
  echo "== pip install -e '${spec}'"
  python3 -m pip install -q --disable-pip-version-check -e "${spec}"
fi
