#!/usr/bin/env bash
# Regenerates docs/examples/: results of FT-L, LoRA and ODEdit+LoRA on the embedded tiny world (single
# protocol, 20 edits, seeds 0-2; sequential, 20 edits, seeds 0-1), the report made from them, and the
# model card of the ODEdit+LoRA sequential adapter (seed 0) and the hidden-state projection of its edits.
#   bash docs/examples/make_examples.sh            (the tiny world is built first if it is not cached)
set -euo pipefail
cd "$(dirname "$0")"
ODEDIT=${ODEDIT:-odedit-hf}
OUT=results
mkdir -p "$OUT"
WORLD=$($ODEDIT world build --preset tiny --no-progress | sed -n 's/^world .* at //p')
N=20
for method in ftl lora odedit+lora; do
  for seed in 0 1 2; do
    $ODEDIT edit --model "$WORLD/model" --data "$WORLD" --method "$method" --protocol single --n $N \
      --seed $seed --no-progress --out "$OUT/${method/+/-}-single-seed$seed.json" > /dev/null
  done
done
for method in lora odedit+lora; do
  for seed in 0 1; do
    extra=()
    if [[ $method == odedit+lora && $seed == 0 ]]; then
      rm -rf /tmp/odedit-hf-example-adapter
      extra=(--save-adapter /tmp/odedit-hf-example-adapter)
    fi
    $ODEDIT edit --model "$WORLD/model" --data "$WORLD" --method "$method" --protocol sequential --n $N \
      --seed $seed --no-progress --out "$OUT/${method/+/-}-sequential-seed$seed.json" "${extra[@]}" > /dev/null
  done
done
# the card as a push would upload it (--dry-run stages the upload without a Hub)
rm -rf /tmp/odedit-hf-example-staged
$ODEDIT push /tmp/odedit-hf-example-adapter user/odedit-lora-tiny-world --dry-run /tmp/odedit-hf-example-staged
cp /tmp/odedit-hf-example-staged/README.md model_card_odedit-lora_sequential.md
# the report, with the hidden-state projection of the ODEdit+LoRA sequential adapter's 20 edits
$ODEDIT report "$OUT"/*.json --out report --title "odedit-hf example: tiny world, 20 edits" \
  --projection-adapter /tmp/odedit-hf-example-adapter --model "$WORLD/model" --data "$WORLD" --n $N
