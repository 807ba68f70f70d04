#!/bin/sh
# The default edit layer's check (docs/architectures.md): SmolLM2-135M-Instruct with the shipped
# recipe, only the edited layer changed, on 12 held-out CounterFact records (the edit split's
# records 1000-1011, never used to tune the recipe), one thread.
# Usage: sh docs/experiments/layer_rule.sh OUTDIR   (about 15 minutes on one CPU core)
set -eu
out=${1:?give an output directory}
mkdir -p "$out"
rrome=${RROME:-.venv/bin/rrome}
python3 -c "
import json, sys
d = json.load(open('/work/shared/data/counterfact/counterfact-edit.json'))
sys.stdout.write(''.join(json.dumps(r) + '\n' for r in d[1000:1012]))" > "$out/records.jsonl"
for layer in 5 3 7 10; do
  sed "s/^layers: .*/layers: [$layer]/" hparams/smollm2-135m.yaml > "$out/layer$layer.yaml"
  OMP_NUM_THREADS=1 "$rrome" edit "$out/records.jsonl" --hparams "$out/layer$layer.yaml" \
    --devices cpu --out "$out/layer$layer" --seed 0
done
