#!/bin/bash
# usage: docs/benchmarks/engine-alone-2026-12-04/run.sh COMPILE(1|0) OUT   (from the repository root; make models first)
cd "$(git rev-parse --show-toplevel)" && . .venv/bin/activate
M=~/.cache/lora-gateway/models/tiny-llama; A=~/.cache/lora-gateway/demo-adapters/demo-a
VLLM_CPU_KVCACHE_SPACE=1 LORA_GATEWAY_LORA_OPS=grouped LORA_GATEWAY_LORA_COMPILE=$1 python -m vllm.entrypoints.openai.api_server --model $M --served-model-name tiny --port 8101 --enable-lora --max-loras 16 --max-lora-rank 16 --lora-modules demo-a=$A > /tmp/engine-alone-$1.log 2>&1 &
for i in $(seq 150); do curl -s localhost:8101/v1/models >/dev/null && break; sleep 2; done
python docs/benchmarks/engine-alone-2026-12-04/drive.py http://127.0.0.1:8101 tiny 4 5 > /dev/null; python docs/benchmarks/engine-alone-2026-12-04/drive.py http://127.0.0.1:8101 demo-a 4 5 >/dev/null
for r in 1 2 3 4 5; do for c in 1 16; do for m in tiny demo-a; do echo "round $r $(python docs/benchmarks/engine-alone-2026-12-04/drive.py http://127.0.0.1:8101 $m $c 8)"; done; done; done > $2
grep -c "LoRA model compiled" /tmp/engine-alone-$1.log >> $2
pkill -f vllm.entrypoints; sleep 2; pkill -9 -f VLLM::; sleep 2
