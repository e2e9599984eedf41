#!/usr/bin/env bash
# The accuracy-versus-memory report: every scheme at 1/2 ... 1/64 of the full tables' bytes,
# 3 seeds, on Frappe, the Avazu 9k sample, the Criteo 8k sample and generated Criteo-shaped data,
# every difference with a 95% paired bootstrap interval over test rows and seeds.
# Run from the project root; the real samples live in ../shared/data (never committed).
# Cells (and their test predictions) are cached in runs/bench/<name>/cells: an interrupted run
# resumes where it stopped, and one cell is trained again by adding e.g. `--rerun hash:1/4:0`
# to its data set's command. One data set alone: `bash docs/accuracy/run.sh avazu`.
set -euo pipefail
S=../shared/data
BENCH=(.venv/bin/ctrserve bench accuracy --seeds 0,1,2 --jobs 1)
ONLY=${1:-all}

if [[ $ONLY == all || $ONLY == frappe ]]; then
  time "${BENCH[@]}" --name Frappe --out docs/accuracy/frappe --cache runs/bench/frappe/cells \
    --data $S/frappe/frappe.validation.libfm --test-data $S/frappe/frappe.test.libfm \
    --split random --dim 16 --top 256,128 --epochs 3 --pep-keep 0.1
fi

if [[ $ONLY == all || $ONLY == avazu ]]; then
  time "${BENCH[@]}" --name "Avazu 9k sample" --out docs/accuracy/avazu \
    --cache runs/bench/avazu/cells --data $S/avazu/avazu_9k.csv --format avazu \
    --split random --dim 16 --top 64 --epochs 3 --batch-size 128
fi

if [[ $ONLY == all || $ONLY == criteo ]]; then
  time "${BENCH[@]}" --name "Criteo 8k sample" --out docs/accuracy/criteo8k \
    --cache runs/bench/criteo8k/cells \
    --data $S/criteo/criteo_kaggle_8k.tsv --fractions 0.72,0.08,0.2 \
    --dim 16 --bottom 64 --top 64 --epochs 3 --batch-size 128
fi

if [[ $ONLY == all || $ONLY == generated ]]; then
  .venv/bin/ctrserve generate criteo --scale 2000 --rows 150000 --seed 0 \
    --out runs/bench/generated
  time "${BENCH[@]}" --name "generated (Criteo sizes / 2000)" --out docs/accuracy/generated \
    --cache runs/bench/generated/cells \
    --data runs/bench/generated/data.parquet --spec runs/bench/generated/spec.json \
    --split random --dim 16 --bottom 64 --top 64 --epochs 1 --lr 0.003 --pep-keep 0.1
fi

# PEP at its premise, wide rows: the full model and PEP at 10% of the values, D = 32 and 64.
if [[ $ONLY == all || $ONLY == frappe-wide ]]; then
  for D in 32 64; do
    time "${BENCH[@]}" --name "Frappe, PEP at D = $D" --out docs/accuracy/frappe-d$D \
      --cache runs/bench/frappe-d$D/cells --schemes full,pep-field-dim,pep-feature-dim \
      --budgets '' --data $S/frappe/frappe.validation.libfm \
      --test-data $S/frappe/frappe.test.libfm --split random --dim $D --top 256,128 \
      --epochs 3 --pep-keep 0.1
  done
fi

# The same at D = 64 on the generated data (its D = 16 keep 0.1 is in the main run above).
if [[ $ONLY == all || $ONLY == generated-wide ]]; then
  time "${BENCH[@]}" --name "generated, PEP at D = 64" --out docs/accuracy/generated-d64 \
    --cache runs/bench/generated-d64/cells --schemes full,pep-field-dim,pep-feature-dim \
    --budgets '' --data runs/bench/generated/data.parquet --spec runs/bench/generated/spec.json \
    --split random --dim 64 --bottom 64 --top 64 --epochs 1 --lr 0.003 --pep-keep 0.1
fi
