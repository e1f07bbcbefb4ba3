#!/bin/bash
# vLLM 0.26.0 onto the offline GPU machine, one device call per part, then the backends bench.
# Runs ON THE DEVICE from the repository root:
#   bash tests/bench/vllm_carry/device_step.sh K    K = 0..5, each call carrying .vllm-carry/vw.tar.part0K
#                                                   (the call with K = 5 also carries .whl)
#   bash tests/bench/vllm_carry/device_step.sh bench [extra bench args]
# The parts (56 MiB each, 6 in all: the trimmed wheel set of vllm 0.26.0 and its
# dependencies for cp312, built by prepare_parts.sh) are kept in /tmp/parts between calls:
# the calls must come back to back, while the machine is still warm. The last one
# reassembles and checks the tar (parts.sha256), installs it with pip --target /tmp/site
# (no index, no deps), installs the server's own carried wheels (.whl: soxr, ...) into
# /tmp/dxsite, and checks that vllm imports. `bench` runs tests.bench.gpu_qwen_omni with
# both stage0 backends (GPU_RUN.md gives the exact commands and the expected times).
set -u
R=$(pwd); H=tests/bench/vllm_carry; OUT=${OUT:-/tmp/out}; NP=6
mkdir -p "$OUT" /tmp/parts
ts() { echo "TS $1 $(date +%s.%N)"; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
K=${1:?usage: device_step.sh K|bench}; shift
ts start
if [ "$K" = bench ]; then
  [ -f /tmp/site/.vllm_ok ] || { echo "vllm is not installed on this machine (the part calls 0..5 must come first, back to back)"; exit 5; }
  export PYTHONPATH=/tmp/site:/tmp/dxsite${PYTHONPATH:+:$PYTHONPATH}
  export VLLM_CACHE_ROOT=/tmp/vllm-cache
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/gpu.txt"
  timeout 590 python3 -m tests.bench.gpu_qwen_omni --backends transformers,vllm --skip micro,stock \
    --budget-s 520 --out "$OUT/qwen_backends.json" --vllm-model-dir /tmp/vllm-model "$@" 2>&1 | tee "$OUT/bench.log" \
    | grep -vE '^\(|WARNING|INFO' | tail -80
  echo "bench rc=${PIPESTATUS[0]}"; ts end; exit 0
fi
mv .vllm-carry/vw.tar.part* /tmp/parts/ 2>/dev/null
P=$(printf 'vw.tar.part%02d' "$K")
(cd /tmp/parts && grep " $P\$" "$R/$H/parts.sha256" | sha256sum -c -) || { echo "PART $P BAD OR MISSING"; exit 2; }
N=$(ls /tmp/parts | wc -l)
if [ "$N" -ne $((K+1)) ]; then echo "MACHINE WENT BACK? have $N parts, expected $((K+1)): start again at part 0"; exit 3; fi
ts part_ok
if [ "$K" = 0 ]; then
  { nvidia-smi; python3 -V; nproc; free -g | head -2
    python3 -m pip list 2>/dev/null | grep -iE '^(torch|transformers|tokenizers|numpy|uvloop|prometheus.client|soxr|msgspec|pyzmq|websockets) '
  } > "$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
fi
if [ "$K" = $((NP-1)) ]; then
  set -o pipefail
  cd /tmp && cat /tmp/parts/vw.tar.part* > /tmp/vw.tar && grep ' vw.tar$' "$R/$H/parts.sha256" | sha256sum -c - || exit 4
  rm -rf /tmp/parts; tar xf /tmp/vw.tar -C /tmp && rm /tmp/vw.tar; cd "$R"
  ts untarred
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/wheels/*.whl 2>&1 | tail -5
  rm -rf /tmp/wheels
  if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/dxsite .whl/*.whl 2>&1 | tail -5
  else
    echo "no .whl carried: the server's own wheels (soxr, ...) must be on the image"
  fi
  ts installed
  PYTHONPATH=/tmp/site:/tmp/dxsite python3 -c "
import vllm, vllm._C_stable_libtorch, torch, transformers, zmq, msgspec, websockets
print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)
from vllm import LLMEngine; print('LLMEngine ok')" 2>&1 | tail -8 | tee "$OUT/import.txt"
  grep -q 'LLMEngine ok' "$OUT/import.txt" && touch /tmp/site/.vllm_ok
  ts imported
fi
ts end
