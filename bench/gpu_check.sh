#!/usr/bin/env bash
# The GPU checks of hftlab in one short command (a lent GPU machine has minutes, not hours):
#   bash bench/gpu_check.sh [part ...]   parts: gpu-tests tests organism loop defenses (default: gpu-tests organism loop)
#     gpu-tests  the end-to-end tests (every defense through `hftlab run`, sweeps, real-model runs) on the GPU
#     tests      the fast suite as `make test` runs it (pinned to the CPU by tests/conftest.py); $TESTS: which
# Writes one file per part under $OUT (default /tmp/gpu_check); every part has its own time limit, so a
# slow part cannot starve the others. Needs the organism cached in $HFTLAB_HOME (default ./.hftlab) and,
# where the machine lacks the pinned packages, their wheels in ./.whl (installed into /tmp/site).
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export HFTLAB_HOME=${HFTLAB_HOME:-$PWD/.hftlab}
parts=${*:-gpu-tests organism loop}
{ nvidia-smi -L; python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"; nproc; } >"$OUT/env.txt" 2>&1

pids=()
if [[ " $parts " == *" organism "* ]]; then  # the main job on the GPU: the loader's default dtype and fp32
  for dtype in auto float32; do
    (timeout 240 python3 -m hftlab run seed=0 model.dtype=$dtype out_dir=/tmp/gpu_runs_$dtype --json \
      >"$OUT/run_$dtype.json" 2>"$OUT/run_$dtype.log"; echo "rc $?" >>"$OUT/run_$dtype.log") &
    pids+=($!)
  done
fi
if [[ " $parts " == *" tests "* ]]; then
  (timeout 240 python3 -m pytest -q -n 6 -p no:cacheprovider ${TESTS:-tests} >"$OUT/pytest.txt" 2>&1
   echo "rc $?" >>"$OUT/pytest.txt") &
  pids+=($!)
fi
if [[ " $parts " == *" gpu-tests "* ]]; then
  ACCELERATE_USE_CPU=0 timeout 180 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_contract.py \
    tests/test_pipeline.py tests/test_sweep.py tests/real/test_real_run.py tests/unit/test_generate.py \
    >"$OUT/pytest_gpu.txt" 2>&1
  echo "rc $?" >>"$OUT/pytest_gpu.txt"
fi
for p in "${pids[@]}"; do wait "$p"; done
if [[ " $parts " == *" loop "* ]]; then  # hftlab's loop vs plain PyTorch+PEFT at the Llama-3.2-1B shape
  timeout 90 python3 bench/gpu_loop.py >"$OUT/gpu_loop.txt" 2>&1; echo "rc $?" >>"$OUT/gpu_loop.txt"
fi
if [[ " $parts " == *" defenses "* ]]; then  # alignment-stage defenses' step-time ratios at the 1B shape
  timeout 100 python3 -m bench.alignment_defenses --shape llama-1b --lora --steps 8 >"$OUT/align_1b.txt" 2>&1
  timeout 100 python3 -m bench.alignment_defenses --shape llama-1b --lora --steps 8 --harmful-like-alignment \
    >"$OUT/align_1b_equal.txt" 2>&1
fi
ls -la "$OUT"
