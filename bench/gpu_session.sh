#!/usr/bin/env bash
# One call on the lent GPU machine: install the web wheels, run the GPU tests, then the
# hibernation bench (8B shape, warm restore three times) and the first-use trace. Logs and
# JSON under $OUT. Fits one `run` call (<= 600 s) when the machine is fresh.
#
#   run (kind nvidia-h100-x1, carry [".whl"]):  bash bench/gpu_session.sh
#
# .whl holds fastapi, starlette, uvicorn, pydantic, pydantic-core, annotated-types,
# typing-inspection, annotated-doc and opentelemetry-api for Python 3.12 (the device has no
# network); see the device README for the pip download line. Set SKIP_ANCHORS=0 to also run the
# from_pretrained / load_file anchors (~150 s more), WARM_RUNS=N for more warm restores.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1

timeout 200 python3 -m pytest -q -x tests/engines/test_engine_image_gpu.py tests/engines/test_gpu_units.py \
    tests/engines/test_gpu_engine.py > "$OUT/pytest.txt" 2>&1
echo "GPU tests: $(tail -1 "$OUT/pytest.txt")"

anchors=--skip-anchors
[ "${SKIP_ANCHORS:-1}" = 0 ] && anchors=
timeout 400 python3 bench/bench_hibernate.py --config bench/configs/qwen3-8b.json --device cuda --warm-runs ${WARM_RUNS:-3} \
    $anchors --out "$OUT/hib8.json" > "$OUT/hib8.txt" 2>&1
echo "bench_hibernate rc=$?"
grep -A4 '_to_first_token_s\|_runs_s\|/ disk' "$OUT/hib8.json" | head -30
grep "runner ready\|graph capture starts\|tokenizer loaded\|arena of\|restore:\|ready after\|standby" "$OUT/hib8.gateway.log" \
    | cut -c1-200 | tail -16

M=/tmp/m06
python3 -c "import sys; sys.path.insert(0, 'bench'); from random_model import make_random_model; make_random_model('bench/configs/qwen3-0.6b.json', '$M')" > /dev/null 2>&1
timeout 60 python3 bench/trace_first_use.py "$M" > "$OUT/first_use1.txt" 2>&1  # fills Triton's cache
timeout 60 python3 bench/trace_first_use.py "$M" --top 40 > "$OUT/first_use2.txt" 2>&1
grep -v "^ *[0-9]* ms" "$OUT/first_use2.txt" | head -24
