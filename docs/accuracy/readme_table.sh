#!/usr/bin/env bash
# The README's table "full, hashing and QR at 4x fewer embedding bytes": logistic regression,
# full tables, hashing (4x) and QR (4 collisions) on Frappe, the Criteo 8k sample and the Avazu
# 9k sample, 3 training seeds each on one fixed split, at most 60 epochs with patience 3 (the
# best validation epoch kept); the full model without hidden unknown values too. Then every
# comparison the README states, with its 95% paired bootstrap interval over test rows and seeds.
# Run from the project root; the real samples live in ../shared/data (never committed).
set -euo pipefail
S=../shared/data
CTR=.venv/bin/ctrserve
OUT=runs/readme
declare -A DATA=(
  [frappe]="--data $S/frappe/frappe.validation.libfm --test-data $S/frappe/frappe.test.libfm --split random --dim 16 --top 256,128"
  [criteo]="--data $S/criteo/criteo_kaggle_8k.tsv --fractions 0.72,0.08,0.2 --dim 16 --bottom 64 --top 64 --batch-size 128"
  [avazu]="--data $S/avazu/avazu_9k.csv --format avazu --split random --dim 16 --top 64 --batch-size 128"
)
declare -A MODEL=(
  [lr]="--model lr --lr 0.01 --embedding-lr 0.003 --min-frequency 3"
  [full]="--scheme full"
  [full-known]="--scheme full --unknown-rate 0"
  [hash]="--scheme hash --compression 4"
  [qr]="--scheme qr --collisions 4 --operation mult"
)
for ds in frappe criteo avazu; do
  for model in lr full full-known hash qr; do
    for seed in 0 1 2; do
      [[ -f $OUT/$ds-$model-$seed/config.json ]] && continue
      # shellcheck disable=SC2086
      $CTR train ${DATA[$ds]} ${MODEL[$model]} --epochs 60 --patience 3 --seed $seed \
        --no-progress --out $OUT/$ds-$model-$seed > $OUT/$ds-$model-$seed.log
    done
  done
done
for ds in frappe criteo avazu; do
  seeds() { echo $OUT/$ds-$1-{0,1,2}; }
  for pair in "full lr" "full hash" "full qr" "qr hash" "full full-known"; do
    read -r a b <<< "$pair"
    echo "$ds: $a against $b"
    # shellcheck disable=SC2046
    $CTR compare $(seeds $a) --against $(seeds $b)
  done
done
# The table: mean (min-max over seeds) of each model's test metrics, its bytes and epochs.
.venv/bin/python - "$OUT" <<'PY'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
print("| data | model | embedding bytes | test AUC | logloss | NE | best epoch / epochs run |")
print("|---|---|---|---|---|---|---|")
for ds in ("frappe", "criteo", "avazu"):
    for model in ("lr", "full", "full-known", "hash", "qr"):
        runs = [json.loads((out / f"{ds}-{model}-{s}" / "config.json").read_text())
                for s in range(3)]
        test = [r["metrics"]["test"] for r in runs]
        stored = sum(t["bytes"] for t in runs[0]["tables"])
        full = sum(t["full_bytes"] for t in runs[0]["tables"])

        def spread(name):
            values = [t[name] for t in test]
            return f"{sum(values) / 3:.4f} ({min(values):.4f}-{max(values):.4f})"

        epochs = ", ".join(f"{r['best_epoch']}/{len(r['history'])}" for r in runs)
        print(f"| {ds} | {model} | {stored / 1024:,.1f} KiB ({full / stored:.2f}x) | "
              f"{spread('auc')} | {spread('logloss')} | {spread('ne')} | {epochs} |")
PY
