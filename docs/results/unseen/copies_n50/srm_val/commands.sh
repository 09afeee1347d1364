set -e

cd "$(git rev-parse --show-toplevel)"
O=runs/srmaug
F="--features sam,sam_stages,efficientnet_lite0 --reduce 256"
alignsam srm-eval --train kvasir:train --val kvasir:val --eval kvasir:val $F --save $O/plain.pt --out $O/plain_val.json
alignsam srm-eval --train "kvasir:train+kvasir:train@crop256+kvasir:train@colour+kvasir:train@blur" --val kvasir:val --eval kvasir:val $F --save $O/aug.pt --out $O/aug_val.json
for s in crop256 hue jpeg20 border; do
  for m in plain aug; do
    alignsam srm-eval --srm $O/$m.pt --eval kvasir:val@$s --out $O/${m}_val_$s.json
  done
done
