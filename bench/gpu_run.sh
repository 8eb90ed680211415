#!/usr/bin/env bash
# One-shot GPU run of bench/core_bench.py on a lent machine (see bench/README.md, "GPU run"). From the repo root:
#
#   bash bench/gpu_run.sh                                  # GPU machine: $OUT set, wheels in .whl/ (carried)
#   GPU_RUN_DRY=1 OUT=/tmp/gpuout bash bench/gpu_run.sh    # CPU dry run here: every stage, tiny sizes
#
# Stages: install the carried wheels into /tmp/site (only what the machine lacks), preflight (versions, imports,
# CUDA), build SD-1.5-shaped random fp16 models into /tmp, core_bench (a)(b)(c) + a P2P batch-size sweep.
# Bounded: the whole script stops by GPU_RUN_BUDGET seconds (default 420); core_bench gets what is left as
# --max-seconds (it skips what would not fit) under a hard `timeout`, and rewrites its results after every
# benchmark, so a cut-short run still returns figures. Files in $OUT: gpu_run.log, core-<gpu>.txt, core-<gpu>.json.
# GPU_RUN_PROFILE=1: build only the P2P model and run bench/gpu_profile.py instead (gpu-profile.json).
# GPU_RUN_STEP=1: build only the P2P model and run bench/step_bench.py instead (issue 17's figures: GPU-busy
# share per step, P2P pair vs diffusers, plain vs diffusers eager and compiled, 16-job batch vs a bare compiled
# UNet loop, warm-up cold and after a restart, peak memory): step-<gpu>.txt/.json. In a dry run it compiles
# on the CPU (tiny model, 64 px, 3 steps), so every path runs end to end.
set -uo pipefail
: "${OUT:?set OUT to the folder for results}"
mkdir -p "$OUT"

main() {
  local budget=${GPU_RUN_BUDGET:-420} dry=${GPU_RUN_DRY:-0} models=${GPU_RUN_MODELS:-/tmp/editserve-gpu-models}
  local t0=$SECONDS
  stage() { echo; echo "=== [$((SECONDS - t0))s] $*"; }
  left() { echo $((budget - (SECONDS - t0))); }
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false PYTHONDONTWRITEBYTECODE=1

  if [ "$dry" = 1 ]; then
    stage "DRY RUN on CPU: no wheel install, tiny models, 64 px, 4 steps"
    local shape=tiny build_dtype=float32
    local bench=(--device cpu --dtype float32 --size 64 --steps 4 --repeats 1 --batch-jobs 4 --sweep 1,2,4
                 --machine "${GPU_RUN_MACHINE:-dry-cpu}")
  else
    stage "install wheels from .whl/ into /tmp/site"
    ls -l .whl/*.whl | awk '{print "  " $5, $9}'
    timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || {
      # a wheel is a zip of what goes into site-packages: unpacking is an install (no pip needed)
      echo "pip install failed: unpacking the wheels into /tmp/site instead"
      python3 -c "import sys, zipfile; [zipfile.ZipFile(w).extractall('/tmp/site') for w in sys.argv[1:]]" .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || { echo "wheel install failed"; return 2; }
    }
    # pydantic needs typing_extensions >= 4.14.1: carried in .whl/optional/, installed only if the machine's is older
    if ! python3 -c "import sys; from importlib.metadata import version; from packaging.version import Version as V; sys.exit(V(version('typing_extensions')) < V('4.14.1'))"; then
      echo "machine's typing_extensions is older than 4.14.1: installing the carried one"
      python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/site')" .whl/optional/typing_extensions-*.whl
    fi
    local shape=sd15-shaped build_dtype=float16
    local bench=(--device cuda --dtype float16 --size 512 --steps 50 --repeats "${GPU_RUN_REPEATS:-3}" --batch-jobs 8
                 --sweep "${GPU_RUN_SWEEP:-1,2,4,8,16}")
    [ -n "${GPU_RUN_MACHINE:-}" ] && bench+=(--machine "$GPU_RUN_MACHINE")  # default: from the GPU's name
  fi

  stage "preflight: GPU, versions, imports"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit,clocks.max.sm --format=csv,noheader
  GPU_RUN_DRY=$dry timeout 180 python3 - <<'EOF' || { echo "preflight failed"; return 3; }
import os, sys, importlib
import torch, diffusers, transformers, huggingface_hub, safetensors, numpy, PIL, pydantic, typing_extensions
from importlib.metadata import version
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, huggingface_hub {huggingface_hub.__version__}, safetensors {version('safetensors')}, "
      f"numpy {numpy.__version__}, pillow {PIL.__version__}, pydantic {pydantic.__version__}, typing_extensions {version('typing_extensions')}")
for mod in (torch, transformers, numpy, diffusers, pydantic):
    print(f"  {mod.__name__:<13} {os.path.dirname(mod.__file__)}")
sys.path.insert(0, os.getcwd())
for name in ("service.config", "worker.models.registry", "worker.models.builders", "worker.editing.batch",
             "worker.editing.p2p", "worker.editing.ip2p", "worker.editing.processor",
             "worker.editing.acceleration", "worker.editing.tensor_controller"):
    importlib.import_module(name)
from worker.models.tokenizer import _bpe_path
assert _bpe_path().exists(), _bpe_path()
print("  editing core imports OK; CLIP BPE merges:", _bpe_path())
if os.environ["GPU_RUN_DRY"] != "1":
    assert torch.cuda.is_available(), "CUDA is not available"
    print("  cuda:", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    try:  # torch.compile on CUDA needs triton (shipped with torch's CUDA wheels); bench/step_bench.py uses it
        import triton
        print("  triton", triton.__version__)
    except ImportError:
        print("  triton missing: compiled figures in step_bench will fail")
EOF

  stage "build random-weight models ($shape, $build_dtype) into $models (both at once)"
  rm -rf "$models" && mkdir -p "$models"
  local pids=() kind kinds="text2image instruct"
  [ "${GPU_RUN_PROFILE:-0}" = 1 ] && kinds=text2image  # the profile needs only the P2P model
  [ "${GPU_RUN_STEP:-0}" = 1 ] && kinds=text2image  # so does the step bench
  for kind in $kinds; do
    OMP_NUM_THREADS=$(( $(nproc) > 2 ? $(nproc) / 2 : 1 )) timeout 240 \
      python3 -m worker.models.builders --out "$models/$kind" --shape "$shape" --kind "$kind" --dtype "$build_dtype" \
      > "$models/build-$kind.log" 2>&1 &
    pids+=($!)
  done
  local failed=0 i=0
  for kind in $kinds; do
    wait "${pids[$i]}" || failed=1
    i=$((i + 1))
    tr '\r' '\n' < "$models/build-$kind.log" | grep -v -i "safety checker\|warn\|shards\|^ *$" | tail -3 | sed "s/^/  [$kind] /"
  done
  [ $failed = 0 ] || { echo "model build failed"; return 4; }
  du -sh "$models"/*/

  if [ "${GPU_RUN_PROFILE:-0}" = 1 ]; then
    stage "gpu_profile: where a P2P pair's step time goes (GPU busy share, kernels per step)"
    local dev=(--device cuda --dtype float16 --size 512)
    [ "$dry" = 1 ] && dev=(--device cpu --dtype float32 --size 64 --steps 4 --repeats 1)
    timeout -k 10 $(( $(left) - 10 )) python3 bench/gpu_profile.py --model "$models/text2image" "${dev[@]}" --out "$OUT"
    local prc=$?
    [ "$dry" = 1 ] || rm -rf "$models"
    return $prc
  fi

  if [ "${GPU_RUN_STEP:-0}" = 1 ]; then
    local shard=$(( $(left) - 10 ))
    local sdev=(--device cuda --dtype float16 --size 512 --steps 50 --repeats "${GPU_RUN_REPEATS:-3}" --jobs 16)
    [ "$dry" = 1 ] && sdev=(--tiny --jobs 4)
    [ -n "${GPU_RUN_MACHINE:-}" ] && sdev+=(--machine "$GPU_RUN_MACHINE")
    [ "$dry" = 1 ] && [ -z "${GPU_RUN_MACHINE:-}" ] && sdev+=(--machine dry-cpu)
    stage "step_bench: ${sdev[*]} (soft budget $((shard - 25))s, killed at ${shard}s)"
    timeout -k 10 "$shard" python3 bench/step_bench.py --model "$models/text2image" "${sdev[@]}" --out "$OUT" \
      --max-seconds $((shard - 25))
    local src=$?
    [ $src = 124 ] || [ $src = 137 ] && echo "step_bench hit the hard timeout: partial results only"
    stage "done (step_bench exit status $src); files in \$OUT:"
    ls -la "$OUT"
    [ "$dry" = 1 ] || rm -rf "$models"
    return $src
  fi

  local hard=$(( $(left) - 10 ))
  [ "$hard" -ge 60 ] || { echo "only ${hard}s left for core_bench: not starting it"; return 5; }
  stage "core_bench: ${bench[*]} (soft budget $((hard - 25))s, killed at ${hard}s)"
  timeout -k 10 "$hard" python3 bench/core_bench.py --p2p-model "$models/text2image" --ip2p-model "$models/instruct" \
    "${bench[@]}" --out "$OUT" --max-seconds $((hard - 25))
  local rc=$?
  [ $rc = 124 ] || [ $rc = 137 ] && echo "core_bench hit the hard timeout: partial results only"

  stage "done (core_bench exit status $rc); files in \$OUT:"
  ls -la "$OUT"
  [ "$dry" = 1 ] || rm -rf "$models"
  return $rc
}

main 2>&1 | tee "$OUT/gpu_run.log"
exit "${PIPESTATUS[0]}"
