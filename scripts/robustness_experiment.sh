#!/usr/bin/env bash
# Tuning experiments on the model organism, as one command sequence (docs/tuning.md).
#
#   A. SN-Tune of the unaligned organism on its safety neurons (refusal documents plus
#      harmless retain documents), and full fine-tuning on the same documents (wall-time
#      comparison);
#   B. Deact-SN vs Deact-R on the aligned organism (same per-layer counts, one per random seed);
#   C. robustness: RSN-Tune (safety minus foundation neurons) and its random-set controls, then plain full fine-tuning of
#      the original, SN-Tune and RSN-Tune checkpoints on benign Alpaca instructions;
#   D. one `neuronguard eval` over every checkpoint (held-out test split, general_text_test).
#
# Every knob is an environment variable; outputs go under $RUN (git-ignored `runs/`).
# Usage: scripts/robustness_experiment.sh            (ORG, SAFETY, RUN, ... to override)
set -euo pipefail

NG=${NG:-.venv/bin/neuronguard}
PY=${PY:-.venv/bin/python}
ORG=${ORG:-models/organism}                         # holds unaligned/ and aligned/
DATA=${DATA:-models/organism/data}
SAFETY=${SAFETY:-$ORG/bundle/neurons.safetensors}   # contrasting safety neurons of the organism
FRAC=${FRAC:-0.05}                                    # share of the model's MLP neurons tuned
RUN=${RUN:-runs/tuning}
LR=${LR:-1e-3}; EPOCHS=${EPOCHS:-1}; DOCS=${DOCS:-200}; BATCH=${BATCH:-8}
RETAIN=${RETAIN:-models/tuning/data/retain_alpaca.jsonl}  # harmless documents; RETAIN= to tune on refusals only
RETAIN_DOCS=${RETAIN_DOCS:-1000}; RETAIN_TOKENS=${RETAIN_TOKENS:-8}  # answered by the model itself, loss on 8 opening tokens
FOUNDATION_PROMPTS=${FOUNDATION_PROMPTS:-models/tuning/data/general_text_prompts.jsonl}
BENIGN_DOCS=${BENIGN_DOCS:-400}; FT_LR=${FT_LR:-3e-4}; FT_EPOCHS=${FT_EPOCHS:-3}
LIMIT=${LIMIT:-}                                      # cap prompts per kind in eval (quick runs)
SEED=${SEED:-0}
RANDOM_SEEDS=${RANDOM_SEEDS:-"1 2 3"}                  # random-neuron controls of SN-Tune, RSN-Tune, Deact

mkdir -p "$RUN"
tune=("$NG" tune --data "$DATA/refusals_train.jsonl" --max-docs "$DOCS" --lr "$LR" --epochs "$EPOCHS"
      --batch-size "$BATCH" --seed "$SEED" --overwrite)
[[ -n $RETAIN ]] && tune+=(--retain "$RETAIN" --max-retain-docs "$RETAIN_DOCS" --retain-target-tokens "$RETAIN_TOKENS")

# A. SN-Tune, the same recipe on random neurons with the same per-layer counts (the control: an
#    SN-Tune effect is claimed only where the safety neurons beat these), and full fine-tuning.
"${tune[@]}" --model "$ORG/unaligned" --neurons "$SAFETY" --top-frac "$FRAC" --out "$RUN/sn-tune"
for r in $RANDOM_SEEDS; do
  "${tune[@]}" --model "$ORG/unaligned" --neurons "$SAFETY" --top-frac "$FRAC" --random "$r" --out "$RUN/sn-tune-random-$r"
done
"${tune[@]}" --model "$ORG/unaligned" --all-params --out "$RUN/full-tune"

# B. Deactivation of the aligned organism: safety neurons vs as many random ones per layer.
"$NG" deactivate --model "$ORG/aligned" --neurons "$SAFETY" --top-frac "$FRAC" --out "$RUN/deact-sn" --overwrite
for r in $RANDOM_SEEDS; do
  "$NG" deactivate --model "$ORG/aligned" --neurons "$SAFETY" --top-frac "$FRAC" --random "$r" --out "$RUN/deact-r-$r" --overwrite
done

# C. RSN-Tune: foundation neurons on general text, excluded from the tuned set.
"$NG" identify --method importance --model "$ORG/unaligned" --prompts "$FOUNDATION_PROMPTS" --out "$RUN/foundation.safetensors"
"${tune[@]}" --model "$ORG/unaligned" --neurons "$SAFETY" --top-frac "$FRAC" --exclude "$RUN/foundation.safetensors" --out "$RUN/rsn-tune"
for r in $RANDOM_SEEDS; do  # the same random draws as SN-Tune's controls, minus the foundation neurons
  "${tune[@]}" --model "$ORG/unaligned" --neurons "$SAFETY" --top-frac "$FRAC" --random "$r" \
    --exclude "$RUN/foundation.safetensors" --out "$RUN/rsn-tune-random-$r"
done

# C. Downstream benign fine-tuning (all parameters) of each checkpoint.
"$PY" -m neuronguard.models.tuning.benign --out "$RUN/benign.jsonl" --n "$BENIGN_DOCS" --seed "$SEED"
for name in original sn-tune rsn-tune; do
  src=$RUN/$name; [[ $name == original ]] && src=$ORG/unaligned
  "$NG" tune --model "$src" --all-params --data "$RUN/benign.jsonl" --lr "$FT_LR" --epochs "$FT_EPOCHS" \
    --batch-size "$BATCH" --seed "$SEED" --out "$RUN/$name+ft" --overwrite
done

# D. Evaluate everything side by side.
models=()
for r in $RANDOM_SEEDS; do
  for kind in sn-tune-random rsn-tune-random deact-r; do models+=(--label "$kind-$r" --model "$RUN/$kind-$r"); done
done
for pair in "original=$ORG/unaligned" "aligned=$ORG/aligned" "sn-tune=$RUN/sn-tune" "full-tune=$RUN/full-tune" \
            "rsn-tune=$RUN/rsn-tune" "deact-sn=$RUN/deact-sn" \
            "original+ft=$RUN/original+ft" "sn-tune+ft=$RUN/sn-tune+ft" "rsn-tune+ft=$RUN/rsn-tune+ft"; do
  models+=(--label "${pair%%=*}" --model "${pair#*=}")
done
"$NG" eval "${models[@]}" ${LIMIT:+--limit "$LIMIT"} --out "$RUN/eval" --overwrite
