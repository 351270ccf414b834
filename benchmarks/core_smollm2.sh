#!/usr/bin/env bash
# The core issue's measurements for one model: float perplexity, then PT² (paper
# defaults), GPTQ 2-bit g128 and RTN ternary, each quantized, inspected and evaluated
# (full WikiText-2 and C4, seqlen 2048). Usage: benchmarks/core_smollm2.sh MODEL OUTDIR [DEVICE]
set -euo pipefail
model=$1; out=$2; dev=${3:-cuda}
mkdir -p "$out"
py=${PYTHON:-python3}
$py -m pt2llm eval "$model" --ppl wikitext2,c4 --device "$dev" --no-progress --json "$out/fp16.eval.json" 2>&1 | grep -v Loading
for spec in "pt2|" "gptq2|--method gptq --bits 2" "rtn|--method rtn"; do
  name=${spec%%|*}; args=${spec#*|}
  # shellcheck disable=SC2086
  $py -m pt2llm quantize "$model" --out "/tmp/q-$name" --overwrite --device "$dev" --no-progress \
      --report "$out/$name.quant.json" $args 2>&1 | grep -v Loading
  $py -m pt2llm inspect "/tmp/q-$name" --json "$out/$name.inspect.json" | tail -2
  $py -m pt2llm eval "/tmp/q-$name" --ppl wikitext2,c4 --device "$dev" --no-progress \
      --json "$out/$name.eval.json" 2>&1 | grep -v Loading
done
