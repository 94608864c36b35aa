#!/bin/bash
# usage: docs/benchmarks/engine-alone-gathered-2026-12-04/run.sh LABEL OUT  (from the repository root; make models and a scale run first, for the scale-1000 adapters)
cd "$(git rev-parse --show-toplevel)" && . .venv/bin/activate
M=~/.cache/lora-gateway/models/tiny-llama; S=~/.cache/lora-gateway/loadtest-adapters/scale-1000
MODS=""; for i in $(seq -w 0 31); do MODS="$MODS rand-$i=$S/rand-$i"; done
VLLM_CPU_KVCACHE_SPACE=1 LORA_GATEWAY_LORA_OPS=grouped LORA_GATEWAY_LORA_COMPILE=1 python -m vllm.entrypoints.openai.api_server --model $M --served-model-name tiny --port 8101 --enable-lora --max-loras 32 --max-cpu-loras 64 --max-lora-rank 8 --lora-modules $MODS > /tmp/engine-gathered-$1.log 2>&1 &
for i in $(seq 150); do curl -s localhost:8101/v1/models >/dev/null && break; sleep 2; done
python docs/benchmarks/engine-alone-gathered-2026-12-04/drive_k.py http://127.0.0.1:8101 32 32 8 > /dev/null
for r in 1 2 3; do for k in 4 32; do echo "$1 round $r $(python docs/benchmarks/engine-alone-gathered-2026-12-04/drive_k.py http://127.0.0.1:8101 $k 32 10)"; done; done >> $2
pkill -f vllm.entrypoints; sleep 2; pkill -9 -f VLLM::; sleep 2
