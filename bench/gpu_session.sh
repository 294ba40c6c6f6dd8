#!/usr/bin/env bash
# One part per call on the lent GPU machine (each fits one `run` call, <= 600 s):
#
#   run (kind nvidia-h200, carry [".whl"]):  bash bench/gpu_session.sh PART
#
#   tests       the GPU tests but FP8's (part fp8)              -> $OUT/pytest.txt
#   gpu         bench_gpu.py, Qwen3-8B shape                    -> $OUT/results/gpu/latest.json
#   hibernate   bench_hibernate.py, Qwen3-8B shape, 3 warm restores, anchors included
#                                                               -> $OUT/results/hibernate-gpu/latest.json
#   arena       bench_gpu_arena.py, chunk sizes 128-1024 MiB    -> $OUT/results/gpu-arena/latest.json
#   swap        bench_swap.py, Zipf trace over SWAP_MODELS (12) Qwen3-8B-shape models,
#               SWAP_REQUESTS (200), SWAP_MODE (placed|restart|both; default placed), SWAP_GPU_BUDGET
#               (dormant's budgets.gpu_memory, e.g. 45GiB: two 8B models run, two more sleep in RAM);
#               a later call on the same warm machine merges the earlier mode's result (placed, then
#               SWAP_MODE=restart: the anchor beside it). SWAP_FP8=block|channel: the models in that
#               FP8 format (9.4 GB folder and images against 16.4: about five images fit the disk
#               beside the folder, not two), in /tmp/bench-swap-fp8-FORMAT; each format's run
#               first deletes the other formats' swap folders (the disk is what it measures)
#                                                               -> $OUT/results/swap/latest.json
#                                                  (SWAP_FP8: $OUT/results/swap/fp8-FORMAT.json)
#   guided      bench_guided.py, Qwen3-8B shape, json_schema vs none at batch 1 and 32, with
#               SmolLM2's tokenizer from .whl/tok-smollm2 (tokenizer.json, tokenizer_config.json,
#               special_tokens_map.json)                        -> $OUT/results/guided/latest.json
#   suspend     bench_suspend.py, Qwen3-8B shape: the driver's checkpoint API probed on a plain
#               CUDA process, then SUSPEND_CYCLES (5) asleep -> suspended -> request cycles of
#               the native engine through dormant serve         -> $OUT/results/suspend/latest.json
#               SUSPEND_PROBE=variants: also probes holding 16 GiB, 16 GiB pinned host, 2,500
#               graphs; SUSPEND_PROBE=only: those probes alone (~1 min)
#                                                               -> $OUT/results/suspend-probe/latest.json
#   pin         bench_pin.py: ways to pin a host backup (PIN_GIB, 8), seconds/GiB and how long
#               another thread's CUDA calls wait meanwhile (~2 min)  -> $OUT/results/pin/latest.json
#   fp8-gemv    bench_fp8_gemv.py: decode's FP8 GEMMs (Qwen3-8B shapes, 1-16 rows, both formats), fp8_gemv's
#               candidate configs vs fused_fp8_gemm and bf16 F.linear (~3-4 min); the best written as this
#               GPU's file in dormant/engines/native/kernels/gemv_configs/ (commit it: fp8_linear serves from
#               it), also kept in /tmp for a later fp8 part   -> $OUT/results/fp8-gemv/latest.json, $OUT/gemv_configs/
#               GEMV_MS=1: one-row GEMMs only (~2 min), the file's other entries kept
#   vllm-chunk  copies the carried .vllmN/part.* (../shared/vllm-on-device/prepare.sh made them)
#               to /tmp/vchunks; the call that carries the last one unpacks vLLM into /tmp/vsite
#               (one call per chunk, back to back, on the same warm machine)
#   vllm        bench_vllm_engine.py on a Qwen3-8B-shape model: vLLM alone (the anchor, its
#               compile cache cold; 110 s on 2026-12-02), then under dormant: asleep, suspended,
#               stopped (190 s), ~6 min with the model's making. VLLM_PART=alone: the anchor only,
#               kept in /tmp for VLLM_PART=dormant in a later call on the same machine; SKIP_ALONE=1:
#               dormant's part without the anchor    -> $OUT/results/vllm-engine/latest.json
#   vllm-tests  tests/gpu/test_vllm_gpu.py (a tiny random Qwen3 under dormant serve: tiers, two
#               vLLM models, a native one beside) and test_suspend_gpu.py's two-process test
#               (serial vs parallel checkpoint), ~4.5 min, with vLLM from /tmp/vsite (after the
#               vllm-chunk calls)                                  -> $OUT/vllm-pytest.txt
#   burst       bench_burst.py, Qwen3-8B shape, default config: 64 x 512/128 streams, first burst
#               after a cold start, a restore and a wake; the curve 1-256 (~4-5 min; the model
#               is made first if the machine has none); vLLM's figures beside it when
#               burst-vllm ran before on the same machine         -> $OUT/results/burst/latest.json
#   burst-ab    bench_burst.py --cold-only (cold bursts, curve 1/64) twice: the worker's GIL switch interval at
#               Python's 5 ms and at dormant's 0.5 ms (DORMANT_GIL_SWITCH_S), ~4 min
#                                                               -> $OUT/results/burst-ab/gil-*.json
#   fp8         FP8 checkpoints (issue 12): FP8_PART=tests (~3-4 min): tests/gpu/test_fp8_gpu.py and
#               tests/unit/engines/native/test_fp8.py            -> $OUT/fp8-pytest.txt
#               FP8_PART=bench (~5-6 min): bench_fp8.py, Qwen3-8B shape, bf16 vs FP8 block and
#               channel, batch-1/16 decode, image bytes, wake/restore tokens (reuses the burst
#               parts' bf16 folder if there)                   -> $OUT/results/fp8/latest.json
#               (no FP8_PART: both, which may not fit one call)
#   scale       bench_scale.py: the Qwen3-32B shape in FP8 (34 GB, made on the GPU into /dev/shm when it has
#               room): cold start, asleep, restore warm and cold -> first token (~6-8 min); the other parts'
#               model folders under /tmp are deleted first (the image needs 34 GB of the disk); SCALE_VLLM=1:
#               vLLM's start and wake too (vLLM in /tmp/vsite); SCALE_VLLM=only: vLLM's alone, beside our
#               figures from the committed results/scale/latest.json  -> $OUT/results/scale/latest.json
#   burst-vllm  the same through vLLM 0.26 (--enable-sleep-mode; no restore) (~5-7 min with its
#               compile). vLLM must be in /tmp/vsite, or its chunks in /tmp/vchunks: carry one
#               .vllmN folder of ../shared/vllm-on-device/prepare.sh per call with
#               `mkdir -p /tmp/vchunks && cp .vllm*/part.* /tmp/vchunks/`, then this part
#               unpacks them                                     -> $OUT/results/burst-vllm/latest.json
#
# Logs go beside them in $OUT. To commit a run as the new latest, copy what came back over
# bench/results/ (`cp -r FILES_AT/results/. bench/results/`): the previous one stays in git.
#
# .whl holds fastapi, starlette, uvicorn, pydantic, pydantic-core, annotated-types,
# typing-inspection, annotated-doc, opentelemetry-api, llguidance (abi3, manylinux_2_31), gguf, uvloop
# and httptools (the worker's loop and HTTP parser), and loguru (vLLM 0.26's FP8 path imports it: the
# scale part's vLLM start failed without it) for Python 3.12 (the device has no network; without llguidance the native worker cannot start); the device README has the pip download line. Settings: MODELS (gpu; default
# qwen3-8b), WARM_RUNS (hibernate; default 3), SKIP_ANCHORS=1 (hibernate: no from_pretrained /
# load_file anchors, ~150 s less), GPU_TESTS (tests: the files to run).
set -u
case "${1:-}" in
tests | gpu | hibernate | arena | swap | guided | suspend | pin | fp8-gemv | vllm-chunk | vllm | vllm-tests | burst | burst-ab | burst-vllm | fp8 | scale) ;;
*) echo "usage: bash bench/gpu_session.sh tests|gpu|hibernate|arena|swap|guided|suspend|pin|fp8-gemv|vllm-chunk|vllm|vllm-tests|burst|burst-ab|burst-vllm|fp8|scale" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1

case "${1:-}" in
tests)
    # the FP8 tests run in their own part (fp8): with them this one would not fit its 500 s
    timeout 500 python3 -m pytest -q -rs ${GPU_TESTS:-tests/gpu --ignore=tests/gpu/test_fp8_gpu.py $(ls tests/unit/engines/native/test_cuda_*.py) tests/unit/engines/native/test_engine_image_device.py} > "$OUT/pytest.txt" 2>&1
    echo "GPU tests: $(tail -1 "$OUT/pytest.txt")"
    ;;
gpu)
    timeout 580 python3 bench/bench_gpu.py --models "${MODELS:-qwen3-8b}" --out "$OUT/results/gpu/latest.json" \
        > "$OUT/gpu.txt" 2>&1
    echo "bench_gpu rc=$?"
    grep -A12 "^figure" "$OUT/gpu.txt"
    ;;
hibernate)
    anchors=
    [ "${SKIP_ANCHORS:-0}" = 1 ] && anchors=--skip-anchors
    timeout 580 python3 bench/bench_hibernate.py --config bench/configs/qwen3-8b.json --device cuda \
        --warm-runs "${WARM_RUNS:-3}" $anchors --out "$OUT/results/hibernate-gpu/latest.json" \
        --log "$OUT/hibernate-gpu.gateway.log" > "$OUT/hibernate-gpu.txt" 2>&1
    echo "bench_hibernate rc=$?"
    grep -A8 "^figure" "$OUT/hibernate-gpu.txt"
    grep "runner ready\|graph capture starts\|tokenizer loaded\|arena of\|restore:\|ready after\|standby" \
        "$OUT/hibernate-gpu.gateway.log" | cut -c1-200 | tail -16
    ;;
arena)
    timeout 580 python3 bench/bench_gpu_arena.py --chunk-mib 128,256,512,1024 \
        --out "$OUT/results/gpu-arena/latest.json" > "$OUT/gpu-arena.txt" 2>&1
    echo "bench_gpu_arena rc=$?"
    tail -14 "$OUT/gpu-arena.txt"
    ;;
swap)
    # one folder and one result per weights format: bf16 (latest) or SWAP_FP8's (fp8-block, fp8-channel)
    result=latest work=/tmp/bench-swap
    [ -n "${SWAP_FP8:-}" ] && result=fp8-$SWAP_FP8 work=/tmp/bench-swap-fp8-$SWAP_FP8
    # another format's model folder and images would take the disk whose room this run measures
    for d in /tmp/bench-swap /tmp/bench-swap-fp8-*; do [ "$d" != "$work" ] && rm -rf "$d"; done
    df -h /tmp | tail -1
    timeout 590 python3 bench/bench_swap.py --models "${SWAP_MODELS:-12}" --requests "${SWAP_REQUESTS:-200}" \
        --mode "${SWAP_MODE:-placed}" --deadline "${SWAP_DEADLINE:-420}" ${SWAP_GPU_BUDGET:+--gpu-budget "$SWAP_GPU_BUDGET"} \
        ${SWAP_FP8:+--fp8 "$SWAP_FP8"} --workdir "$work" \
        $([ -f /tmp/swap-$result.json ] && echo --merge /tmp/swap-$result.json) \
        --out "$OUT/results/swap/$result.json" > "$OUT/swap.txt" 2>&1
    echo "bench_swap rc=$?"
    cp "$OUT/results/swap/$result.json" /tmp/swap-$result.json 2>/dev/null  # the next mode's call merges it
    tail -8 "$OUT/swap.txt"
    for f in "$work"/server-*.log; do [ -f "$f" ] && gzip -c "$f" > "$OUT/$(basename "$f").gz"; done
    ;;
guided)
    timeout 580 python3 bench/bench_guided.py --device cuda --tokenizer .whl/tok-smollm2 \
        --out "$OUT/results/guided/latest.json" > "$OUT/guided.txt" 2>&1
    echo "bench_guided rc=$?"
    tail -12 "$OUT/guided.txt"
    ;;
suspend)
    if [ "${SUSPEND_PROBE:-}" = only ]; then
        timeout 300 python3 bench/bench_suspend.py --probe-variants --probe-only \
            --out "$OUT/results/suspend-probe/latest.json" > "$OUT/suspend-probe.txt" 2>&1
        echo "bench_suspend --probe-only rc=$?"
        grep "API probe\|resumed pids\|suspended pids\|refused\|Error" "$OUT/suspend-probe.txt" | cut -c1-300
        exit
    fi
    probe=
    [ "${SUSPEND_PROBE:-}" = variants ] && probe=--probe-variants
    timeout 570 python3 bench/bench_suspend.py --config bench/configs/qwen3-8b.json --cycles "${SUSPEND_CYCLES:-5}" $probe \
        --workdir /tmp/bench-suspend --out "$OUT/results/suspend/latest.json" > "$OUT/suspend.txt" 2>&1
    echo "bench_suspend rc=$?"
    grep -A5 "^figure" "$OUT/suspend.txt"
    grep "API probe\|cycle\|skipped\|failed\|refused" "$OUT/suspend.txt" | cut -c1-400
    grep -i "suspend\|resum\|checkpoint" /tmp/bench-suspend/gateway.log | cut -c1-300 | tail -12
    cp /tmp/bench-suspend/gateway.log "$OUT/suspend.gateway.log" 2>/dev/null
    ;;
pin)
    timeout 400 python3 bench/bench_pin.py --gib "${PIN_GIB:-8}" --out "$OUT/results/pin/latest.json" > "$OUT/pin.txt" 2>&1
    echo "bench_pin rc=$?"
    cat "$OUT/pin.txt" | cut -c1-300
    ;;
fp8-gemv)
    # GEMV_MS=1: only one-row GEMMs measured (the file keeps its other entries)
    timeout 280 python3 bench/bench_fp8_gemv.py --write-table --ms "${GEMV_MS:-1,2,4,8,16}" \
        --out "$OUT/results/fp8-gemv/latest.json" > "$OUT/fp8-gemv.txt" 2>&1
    # the measured configs, to commit and for a later fp8 part on this machine to serve from
    mkdir -p "$OUT/gemv_configs" /tmp/gemv_configs
    cp dormant/engines/native/kernels/gemv_configs/*.json "$OUT/gemv_configs/" 2>/dev/null
    cp dormant/engines/native/kernels/gemv_configs/*.json /tmp/gemv_configs/ 2>/dev/null
    echo "bench_fp8_gemv rc=$?"
    tail -60 "$OUT/fp8-gemv.txt" | cut -c1-200
    ;;
vllm-chunk)
    mkdir -p /tmp/vchunks && cp .vllm*/part.* /tmp/vchunks/ || exit
    ls -l /tmp/vchunks
    for f in .vllm*/install.sh; do [ -f "$f" ] && bash "$f"; done
    ;;
vllm)
    [ -d /tmp/vsite/vllm ] || { echo "no vLLM in /tmp/vsite: run the vllm-chunk part first, once per .vllmN" >&2; exit 1; }
    timeout 150 python3 -c "import sys; sys.path.insert(0, 'bench'); from random_model import make_random_model
make_random_model('bench/configs/qwen3-8b.json', '/tmp/qwen3-8b')" || exit
    part=
    [ "${SKIP_ALONE:-0}" = 1 ] && part=--skip-alone
    [ "${VLLM_PART:-}" = alone ] && part=--skip-dormant
    [ "${VLLM_PART:-}" = dormant ] && part="--anchor /tmp/vllm-alone.json"
    timeout 420 python3 bench/bench_vllm_engine.py --model /tmp/qwen3-8b --vllm-env PYTHONPATH=/tmp/vsite $part \
        --runs 2 --out "$OUT/results/vllm-engine/latest.json" > "$OUT/vllm-engine.txt" 2>&1
    echo "bench_vllm_engine rc=$?"
    [ "${VLLM_PART:-}" = alone ] && cp "$OUT/results/vllm-engine/latest.json" /tmp/vllm-alone.json && tail -20 "$OUT/vllm-engine.txt"
    grep -A6 "^figure" "$OUT/vllm-engine.txt"
    grep -i "error\|suspend" "$OUT/vllm-engine.txt" | cut -c1-300 | tail -12
    ;;
vllm-tests)
    [ -d /tmp/vsite/vllm ] || { echo "no vLLM in /tmp/vsite: run the vllm-chunk part first, once per .vllmN" >&2; exit 1; }
    # the tests' harness imports openai: vLLM's copy, alone (the rest of /tmp/vsite would shadow
    # the gateway's packages)
    mkdir -p /tmp/oai && for p in openai distro jiter sniffio; do ln -sfn /tmp/vsite/$p /tmp/oai/$p; done
    PYTHONPATH=$PYTHONPATH:/tmp/oai DORMANT_TEST_VLLM_PATH=/tmp/vsite timeout 560 python3 -m pytest -q -rs -s \
        ${GPU_TESTS:-tests/gpu/test_vllm_gpu.py tests/gpu/test_suspend_gpu.py::test_two_cuda_processes_of_one_worker_are_suspended_and_resumed_together} > "$OUT/vllm-pytest.txt" 2>&1
    echo "vLLM GPU tests: $(tail -1 "$OUT/vllm-pytest.txt")"
    grep -E "vLLM tiny:|two CUDA processes|suspend .* resume|FAILED|SKIPPED|ERROR|Error:" "$OUT/vllm-pytest.txt" | cut -c1-400 | head -30
    ;;
burst)
    # the model folder both burst parts share (16.4 GB; with dormant's engine image 33 GB of the
    # 64 GiB disk: another part's model folder under /tmp may have to go first)
    # BURST_LONG_ONLY=1: the cold start and the lone 4,096-token prompt only (~1 min), beside a
    # burst-vllm part's of the same setting -> results/burst/long-prompt.json
    name=latest long=
    [ "${BURST_LONG_ONLY:-0}" = 1 ] && name=long-prompt long=--long-only
    timeout 570 python3 bench/bench_burst.py --model-dir /tmp/dormant-bench-burst/qwen3-8b $long \
        --anchor /tmp/burst-vllm-$name.json --out "$OUT/results/burst/$name.json" --log "$OUT/burst.server.log" \
        > "$OUT/burst.txt" 2>&1
    echo "bench_burst rc=$?"
    grep -v "^\[" "$OUT/burst.txt" | tail -24
    grep "streams:" "$OUT/burst.txt"
    ;;
scale)
    rm -rf /tmp/dormant-bench-burst /tmp/dormant-bench-fp8 /tmp/bench-swap /tmp/bench-swap-fp8-* /tmp/qwen3-8b
    mkdir -p dormant/engines/native/kernels/gemv_configs  # an fp8-gemv part's configs, as the fp8 part
    cp /tmp/gemv_configs/*.json dormant/engines/native/kernels/gemv_configs/ 2>/dev/null
    df -h /tmp /dev/shm | tail -2; free -g | head -2
    vllm=
    [ "${SCALE_VLLM:-0}" = 1 ] && vllm=--vllm && export PYTHONPATH=$PYTHONPATH:/tmp/vsite
    # SCALE_VLLM=only: vLLM alone, ours kept from the committed result (both do not fit one call)
    [ "${SCALE_VLLM:-0}" = only ] && vllm="--vllm --ours-from bench/results/scale/latest.json" && export PYTHONPATH=$PYTHONPATH:/tmp/vsite
    timeout 590 python3 bench/bench_scale.py $vllm --out "$OUT/results/scale/latest.json" > "$OUT/scale.txt" 2>&1
    echo "bench_scale rc=$?"
    tail -22 "$OUT/scale.txt" | cut -c1-250
    cp /tmp/dormant-bench-scale/dormant.log "$OUT/scale.server.log" 2>/dev/null
    ;;
burst-ab)
    for s in ${GIL_SWITCHES:-0.005 0.0005}; do
        DORMANT_GIL_SWITCH_S=$s timeout 280 python3 bench/bench_burst.py --model-dir /tmp/dormant-bench-burst/qwen3-8b \
            --cold-only --curve 1,64 --settle 4 --out "$OUT/results/burst-ab/gil-$s.json" \
            --log "$OUT/burst-ab-$s.server.log" > "$OUT/burst-ab-$s.txt" 2>&1
        echo "GIL switch $s s: bench_burst rc=$?"
        grep "streams:\|engine:" "$OUT/burst-ab-$s.txt" | cut -c1-250
    done
    ;;
fp8)
    # the GEMV configs an fp8-gemv part measured earlier on this machine, over the committed ones
    mkdir -p dormant/engines/native/kernels/gemv_configs
    cp /tmp/gemv_configs/*.json dormant/engines/native/kernels/gemv_configs/ 2>/dev/null
    ls dormant/engines/native/kernels/gemv_configs/
    if [ "${FP8_PART:-tests}" = tests ] || [ -z "${FP8_PART:-}" ]; then
        timeout 280 python3 -m pytest -q -rs -s tests/gpu/test_fp8_gpu.py tests/unit/engines/native/test_fp8.py \
            > "$OUT/fp8-pytest.txt" 2>&1
        echo "FP8 tests: $(tail -1 "$OUT/fp8-pytest.txt")"
        grep -E "relative logit error|weights in the arena|image:|^FAILED|Error" "$OUT/fp8-pytest.txt" | cut -c1-300 | head -30
    fi
    if [ "${FP8_PART:-bench}" = bench ] || [ -z "${FP8_PART:-}" ]; then
        timeout 560 python3 bench/bench_fp8.py --out "$OUT/results/fp8/latest.json" > "$OUT/fp8.txt" 2>&1
        echo "bench_fp8 rc=$?"
        grep "^\[" "$OUT/fp8.txt" | cut -c1-300 | tail -16
        grep -A12 "^figure" "$OUT/fp8.txt"
        grep -m5 "Error\|error" "$OUT/fp8.txt" | cut -c1-300
    fi
    ;;
burst-vllm)
    if [ ! -d /tmp/vsite/vllm ]; then
        mkdir -p /tmp/vchunks /tmp/vsite
        cp .vllm*/part.* /tmp/vchunks/ 2>/dev/null
        cat /tmp/vchunks/part.* 2>/dev/null | gzip -d | tar x -C /tmp/vsite 2>/dev/null \
            || { rm -rf /tmp/vsite; echo "vLLM not unpacked: /tmp/vchunks has $(ls /tmp/vchunks | wc -l) chunk(s); carry the others"; exit 1; }
    fi
    name=latest long=  # BURST_LONG_ONLY=1: vLLM's start, then the lone long prompt only
    [ "${BURST_LONG_ONLY:-0}" = 1 ] && name=long-prompt long=--long-only
    PYTHONPATH=/tmp/vsite:$PYTHONPATH timeout 570 python3 bench/bench_burst.py --server vllm $long \
        --model-dir /tmp/dormant-bench-burst/qwen3-8b --out "$OUT/results/burst-vllm/$name.json" \
        --log "$OUT/burst-vllm.server.log" > "$OUT/burst-vllm.txt" 2>&1
    echo "bench_burst --server vllm rc=$?"
    cp "$OUT/results/burst-vllm/$name.json" /tmp/burst-vllm-$name.json 2>/dev/null
    grep "streams:\|vLLM ready" "$OUT/burst-vllm.txt"
    tail -5 "$OUT/burst-vllm.txt"
    ;;
esac
