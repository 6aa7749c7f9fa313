#!/usr/bin/env bash
# The main job: set up, build the embedded real data, train the quickstart CLIP, evaluate it, build and query its
# FAISS index, and print where everything is. About 10 minutes on a 2-core CPU once set up.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export HF_HUB_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-offline}"
data="${CLIPKIT_DATA:-data}"
run="${CLIPKIT_RUN:-runs/quickstart}"
for name in emoji fashion-mnist; do
  if [ ! -f "$data/$name/dataset.json" ]; then
    echo "== building $name shards into $data/$name"
    clipkit data build "$name" --out "$data/$name" >/dev/null
  fi
done
start=$(date +%s)
if [ -f "$run/summary.json" ] && [ -d "$run/model" ]; then
  echo "== $run holds a finished run: showing its results (train again into another CLIPKIT_RUN=runs/...)"
elif [ -d "$run/checkpoints" ]; then
  echo "== continuing the interrupted run in $run"
  clipkit train recipes/quickstart.yaml "data_root=$data" --out "$run" --resume latest "$@" >/dev/null
else
  echo "== training recipes/quickstart.yaml into $run"
  clipkit train recipes/quickstart.yaml "data_root=$data" --out "$run" "$@" >/dev/null
fi
echo "== trained and evaluated in $(( $(date +%s) - start )) s"
echo "== results"
python3 - "$run" <<'PY'
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
for f in sorted((run / "eval").glob("*.json")):
    r = json.loads(f.read_text())
    shown = {k: round(v, 4) for k, v in r["metrics"].items() if isinstance(v, float)}
    print(f"{r['task']:>9} {r['dataset']:<14} {shown}")
PY
echo '== clipkit index query '"$run"'/index --text "a cat" -k 5'
clipkit index query "$run/index" --text "a cat" -k 5
echo "== run folder: $run (model/: open_clip-loadable weights, eval/, index/, metrics.jsonl, summary.json)"
