#!/usr/bin/env bash
# The H200 runs behind BENCHMARKS.md, in parts that each fit one 10-minute device call.
#   bash benchmarks/h200.sh engine OUT   # engine GPU tests; engine vs plain loop (GPT-2, ResNet-50; fp16, bf16)
#   bash benchmarks/h200.sh face OUT     # `ampray bench` for mlp, cnn, gpt (large); the UI's train function on GPUs
#   bash benchmarks/h200.sh tune OUT     # 8 trials at 0.25 GPU against the same 8 one at a time (GPU 0 only)
#   WORKERS=2 bash benchmarks/h200.sh ddp OUT   # plain torchrun, the engine under torchrun, `ampray train` (2-GPU host;
#                                               # also BATCH (micro-batch, default 16: at 8 the host's CPU
#                                               # time per step is as long as the GPU's, BENCHMARKS.md §6),
#                                               # RUNNERS, REPEATS, LIMIT,
#                                               # BIND=1: every rank bound to its own cores)
#   bash benchmarks/h200.sh ddpdiag OUT  # NCCL logs and step profiles of the engine under torchrun and of Ray (2 GPUs)
#   bash benchmarks/h200.sh gputests OUT  # Ray Train on every GPU, fp16 and bf16
#   bash benchmarks/h200.sh compile OUT   # model.compile against eager at micro-batch 8, one GPU
#   PART=train|tune bash benchmarks/h200.sh scale OUT  # issue 5 on a 4- or 8-GPU host
#   bash benchmarks/h200.sh fsdp OUT      # issue 19, one GPU: fsdp against ddp (GPT-2 small, bf16 and fp16)
#   bash benchmarks/h200.sh fsdpxl OUT    # GPT-2 xl at batch 48: ddp (out of memory expected) against fsdp +
#                                         # CPU offload + activation checkpointing
#   bash benchmarks/h200.sh fill OUT      # issue 18: the batch data.fill_gpu chooses for GPT-2 small, trained at
# Each part prints as it goes and leaves its files in OUT (JSON, Parquet, logs).
# The GPU host has torch but neither Ray nor ampray's own small dependencies: build the kit here with
#   bash ../shared/gpu/build-kit.sh tomli_w==1.2.0 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0
# (without tomli_w, `ampray train` fails on the host as soon as it saves the resolved job), carry .gpukit,
# and start each command with `bash .gpukit/install.sh && export PYTHONPATH=/tmp/gpukit-site:$PWD;`.
set -uo pipefail
part=$1 out=$2
cleanup() {
  # A benchmark stopped by its timeout can leave Ray or torchrun processes on the GPUs, which would slow
  # whatever runs next on the host: stop them.
  ray stop --force >/dev/null 2>&1
  pkill -f torch.distributed.run >/dev/null 2>&1
  pkill -f ampray.orchestrator.cli >/dev/null 2>&1
  true
}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
case $part in
engine)
  python -m pytest -q -p no:cacheprovider tests/gpu/test_engine_gpu.py 2>&1 | tail -15
  python benchmarks/bench_engine.py --models gpt2,resnet50 --precisions fp16,bf16 --fused --cnn-batch 128 \
    --rounds 20 --iters 5 --out "$out/engine_fused.json" ;;
face)
  for spec in "mlp 4096" "cnn 128" "gpt 8"; do
    set -- $spec
    timeout 240 python -m ampray.orchestrator.cli bench --model "$1" --size large --batch-size "$2" \
      --out "$out/bench_$1.parquet"
  done
  timeout 240 python - <<'PY'
import json
from ampray import train_model_with_mixed_precision_interface as train
r = train("gpt", 1, 16, 1e-3, True, True, storage_path="/tmp/ampray-ui")
print(json.dumps({k: r[k] for k in ("device", "workers", "precision", "final_loss", "summary", "tensorboard")}))
print("loss first/last", r["loss"][0], r["loss"][-1], "scale points", len(r["scale"]))
PY
  ;;
tune)
  CUDA_VISIBLE_DEVICES=0 timeout 560 python benchmarks/bench_tune_packing.py --trials 8 --gpus-per-trial 0.25 \
    --steps 100 --out "$out/tune_packing.json"
  cleanup ;;
ddp)
  # About 130 s per row of three runners, mostly start-up. nvidia-smi logs every GPU's clock, utilisation
  # and power alongside, so each run's GPU conditions can be set next to its step time.
  nvidia-smi --query-gpu=timestamp,index,utilization.gpu,clocks.sm,power.draw --format=csv,noheader \
    -lms 200 > "$out/smi.csv" 2>/dev/null & smi=$!
  timeout ${LIMIT:-540} python benchmarks/bench_ray_ddp.py --workers "${WORKERS:-2}" --dtypes bf16 \
    --batch-size "${BATCH:-16}" --accum 4 --allreduce-dtype bf16 --runners "${RUNNERS:-plain,engine,ray}" \
    --repeats "${REPEATS:-3}" --steps 60 --warmup 20 --report-every 20 ${BIND:+--bind-cpus} --smi "$out/smi.csv" \
    --out "$out/ray_ddp${BIND:+_bound}.json"
  kill $smi 2>/dev/null
  cleanup ;;
ddpdiag)
  # Where Ray's ~3% at 2 GPUs goes. Twice, interleaved: the engine under torchrun (with the worker's reports)
  # and Ray's workers, each counting who used the host's CPUs over steps 30-49 (no profiler: full speed),
  # with NCCL's choices (transport, channels, protocol) logged.
  timeout ${LIMIT:-480} python benchmarks/bench_ray_ddp.py --workers ${WORKERS:-2} --dtypes bf16 --accum 4 --allreduce-dtype bf16 \
    --runners engine,ray --repeats ${REPEATS:-2} --steps 60 --warmup 20 --report-every 20 --profile 30:20:cpu \
    --profile-dir "$out/profiles" --nccl-debug "$out/nccl" --out "$out/ddpdiag.json"
  cleanup
  for runner in engine ray; do  # each runner's NCCL choices, the rank/pid prefix cut off so ranks merge
    echo "== $runner"
    cat "$out"/nccl/"$runner"-*.log 2>/dev/null | sed 's/^.*NCCL INFO //' \
      | grep -E "via P2P|via SHM|via NET|algo|proto" | sort | uniq -c | sort -rn | head -6
  done
  for f in "$out"/profiles/*/*rank0.txt; do echo "== $f"; cut -c1-700 "$f"; done
  tar -C "$out" -czf "$out/ddpdiag.tgz" profiles nccl && rm -rf "$out/profiles" "$out/nccl" ;;
scale)
  # Issue 5 (4- or 8-GPU host): `ampray train` against torchrun on 1, 2, 4, 8 workers (what the host has),
  # then 16 trials at 0.25 GPU spread over every GPU. Two calls: PART=train, then PART=tune.
  if [ "${PART:-train}" = train ]; then
    n=$(nvidia-smi -L | wc -l); counts=$(for w in 1 2 4 8; do [ $w -le $n ] && printf '%s,' $w; done)
    nvidia-smi --query-gpu=timestamp,index,utilization.gpu,clocks.sm,power.draw --format=csv,noheader \
      -lms 200 > "$out/smi.csv" 2>/dev/null & smi=$!
    timeout ${LIMIT:-560} python benchmarks/bench_ray_ddp.py --workers "${counts%,}" --dtypes bf16 \
      --batch-size "${BATCH:-16}" --accum 4 --allreduce-dtype bf16 --runners plain,ray --repeats 1 --steps 60 \
      --warmup 20 --report-every 20 --smi "$out/smi.csv" --out "$out/scale.json"
    kill $smi 2>/dev/null
  else
    timeout ${LIMIT:-560} python benchmarks/bench_tune_packing.py --trials 16 --gpus-per-trial 0.25 --steps 100 \
      --packed-only --out "$out/tune16.json"
  fi
  cleanup ;;
compile)
  # model.compile on one GPU, micro-batch 8 (where the host bounds the eager step): plain torchrun eager,
  # then torchrun and `ampray train` both compiled (bf16), then `ampray train` compiled in fp16 (the
  # engine's loss scaler around a compiled model).
  common="--workers 1 --batch-size ${BATCH:-8} --accum 4 --allreduce-dtype bf16 --repeats 1 --steps 60 --warmup 20 --report-every 20"
  nvidia-smi --query-gpu=timestamp,index,utilization.gpu,clocks.sm,power.draw --format=csv,noheader \
    -lms 200 > "$out/smi.csv" 2>/dev/null & smi=$!
  timeout 90 python benchmarks/bench_ray_ddp.py $common --dtypes bf16 --runners plain --smi "$out/smi.csv" --out "$out/eager.json"
  timeout 240 python benchmarks/bench_ray_ddp.py $common --dtypes bf16 --runners plain,ray --compile --smi "$out/smi.csv" --out "$out/compiled_bf16.json"
  timeout 150 python benchmarks/bench_ray_ddp.py $common --dtypes fp16 --runners ray --compile --smi "$out/smi.csv" --out "$out/compiled_fp16.json"
  kill $smi 2>/dev/null
  cleanup ;;
gputests)
  timeout 300 python -m pytest -q -p no:cacheprovider tests/gpu/test_train_gpu.py 2>&1 | tail -5 ;;
fsdp)
  # GPT-2 small under fsdp and ddp in bf16 and fp16: per-step time, peak memory, the loss it reaches.
  timeout 540 python benchmarks/bench_fsdp.py --preset small --batch 8 --dtypes bf16,fp16 --steps 30 \
    --out "$out/fsdp_small.json"
  cleanup ;;
fsdpxl)
  # GPT-2 xl at batch BATCH (48): ddp (out of memory expected, on an H200 too: about 25 GB of fp32 training
  # state and some 2.5 GB of activations a row) against fsdp + CPU offload + checkpointing. A call of its own:
  # on an H100 (session 13) not even the ddp row had printed after 200 s, so GPU memory and the busiest
  # processes are logged every 15 s alongside.
  (while sleep 15; do date +%T; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
     ps -eo pcpu,rss,comm --sort=-pcpu | sed -n 2,3p; done) > "$out/xl_progress.log" 2>&1 & mon=$!
  timeout ${LIMIT:-560} python benchmarks/bench_fsdp.py --preset xl --batch "${BATCH:-48}" --dtypes bf16 --steps 3 \
    --strategies ddp,none --offload --checkpointing --out "$out/fsdp_fit_xl.json"
  kill $mon 2>/dev/null
  cleanup ;;
fill)
  (cd "$out" && timeout 300 python -m ampray.orchestrator.cli train --model gpt --model.options.preset small \
    --run.steps 60 --run.report_every 20 --run.checkpoint_every 60 --name fill --run.storage_path "$out/runs" \
    2>&1 | tee "$out/fill.log" | grep -E "note|error|tokens" )
  cleanup ;;
*) echo "unknown part $part" >&2; exit 2 ;;
esac
