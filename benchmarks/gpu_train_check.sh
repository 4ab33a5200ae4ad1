#!/usr/bin/env bash
# One invocation on a GPU machine: the whole trainer in the GPU configuration, which CI (CPU
# only) never runs. For ZeRO-2 and ZeRO-3 (with gradient checkpointing) on one GPU,
# bf16-mixed, the CUDA WKV kernel:
# STEPS steps with a checkpoint halfway, then the same command again after deleting the final
# checkpoint, which must resume from the halfway one and repeat the second half's losses.
#
#   bash benchmarks/gpu_train_check.sh      # from the repository root; OUT=folder for logs
#
# The GPU image lacks DeepSpeed (and its pydantic, hjson), Hydra (hydra-core, omegaconf,
# antlr4-python3-runtime) and `rwkv` (it ships the World vocabulary): put their wheels in
# .whl/ (gitignored; pure Python except pydantic-core, for the image's Python 3.12) and carry
# it; the script stops at once, naming what is missing, if one does not import. The data is
# this repository's Markdown, tokenised with the World tokenizer's Python engine (no compile).
# About 5 minutes; TRAINER=cpu runs it here.
# Then `rwkv_train.evaluate` (val shards and LAMBADA-style passages) on the GPU against the
# CPU; 4 steps at ctx_len 4096, whole and with trainer.segment_len=512; and last
# bench_train.py eager against --compile.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
TRAINER=${TRAINER:-gpu}
STEPS=${STEPS:-40}
WORK=${WORK:-/tmp/rwkv_gpu_train_check}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/rwkv_torch_extensions}
if ls .whl/*.whl >/dev/null 2>&1 && [ -z "${NO_WHEELS:-}" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
        .whl/*.whl 2>&1 | tail -3
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if ! $PY -c 'import deepspeed, hydra, lightning; from data_prep.tokenizer import default_vocab_path
default_vocab_path()' >"$OUT/imports.log" 2>&1; then
    echo "gpu_train_check: stopped, a package is missing:" | tee -a "$OUT/summary.txt"
    tail -1 "$OUT/imports.log" | tee -a "$OUT/summary.txt"
    exit 1
fi
rm -rf "$WORK"
mkdir -p "$WORK"

echo "=== data"
t0=$SECONDS
timeout 120 $PY -m data_prep.build 'inputs=[README.md,BENCHMARKS.md]' val_fraction=0 \
    tokenizer_backend=python output_dir="$WORK/data" >"$OUT/train_data.log" 2>&1
rc=$?
tail -3 "$OUT/train_data.log"
echo "data: rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
[ "$rc" = 0 ] || exit 1

for stage in 2 3; do
    run="$WORK/zero$stage"
    ckpt=$([ "$stage" = 3 ] && echo true || echo false)
    args=(model=finch_debug "model.grad_checkpoint=$ckpt" "trainer=$TRAINER" trainer.precision=bf16-mixed "deepspeed=zero$stage"
        "data.path=$WORK/data" data.ctx_len=512 data.micro_batch_size=8 data.global_batch_size=8
        data.val_samples=0 "trainer.max_steps=$STEPS" "checkpoint.every_n_steps=$((STEPS / 2))"
        logger=none trainer.progress_bar=false "run_dir=$run")
    echo "=== zero$stage: $STEPS steps"
    timeout 300 $PY -m rwkv_train.train "${args[@]}" >"$OUT/train_zero$stage.log" 2>&1
    echo "zero$stage: rc=$?"
    cp "$run/metrics.jsonl" "$WORK/zero$stage.first.jsonl" 2>/dev/null
    final=$(printf "%s/checkpoints/step%08d" "$run" "$STEPS")
    rm -rf "$final.ckpt" "$final.json"
    echo "=== zero$stage: resumed"
    timeout 300 $PY -m rwkv_train.train "${args[@]}" >"$OUT/train_zero${stage}_resumed.log" 2>&1
    echo "zero$stage resumed: rc=$?"
    grep -h "WKV backend\|resuming from" "$OUT/train_zero${stage}_resumed.log" | sort -u | tail -2
    $PY - "$WORK/zero$stage.first.jsonl" "$run/metrics.jsonl" "$STEPS" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
def steps(path):
    return {r["step"]: r for r in map(json.loads, open(path)) if "train/loss" in r}
first, again, n = steps(sys.argv[1]), steps(sys.argv[2]), int(sys.argv[3])
second_half = range(n // 2 + 1, n + 1)
diff = max(abs(first[s]["train/loss"] - again[s]["train/loss"]) for s in second_half)
tps = [r["perf/tokens_per_sec"] for r in first.values() if "perf/tokens_per_sec" in r]
mem = max(r.get("mem/max_reserved_gib", 0) for r in first.values())
print(f"{sys.argv[1].rsplit('/', 1)[1].split('.')[0]}: loss {first[1]['train/loss']:.3f} -> "
      f"{first[n]['train/loss']:.3f} over {n} steps; resume: max |loss diff| {diff:.2e} over "
      f"steps {n // 2 + 1}-{n}; {tps[-1] / 1e3:.1f}K tokens/s at the end; {mem:.2f} GiB reserved")
EOF
done

# evaluate on the GPU (bf16 autocast, CUDA kernel) against the CPU (fp32) on the ZeRO-2 run's
# final checkpoint, on held-out text: this repository's Python files, one document each.
mkdir -p "$WORK/evaltext"
for f in rwkv_train/*.py rwkv_train/*/*.py; do cp "$f" "$WORK/evaltext/$(echo "$f" | tr / _).txt"; done
timeout 120 $PY -m data_prep.build "inputs=[$WORK/evaltext/*.txt]" val_fraction=0.5 \
    tokenizer_backend=python output_dir="$WORK/evaldata" >"$OUT/evaldata.log" 2>&1
# LAMBADA-style passages (the last word of each of 64 lines of the docstrings) go with it.
grep -h -E '^[A-Za-z].* .* .* [a-z]+$' rwkv_train/*.py | head -n 64 |
    $PY -c 'import json, sys; [print(json.dumps({"text": l.strip()})) for l in sys.stdin]' \
    >"$WORK/lambada.jsonl"
for dev in cuda cpu; do
    timeout 180 $PY -m rwkv_train.evaluate "$WORK/zero2" --data "$WORK/evaldata" --ctx-len 512 \
        --samples 8 --lambada "$WORK/lambada.jsonl" --device $dev --json "$WORK/eval_$dev.jsonl" \
        >"$OUT/evaluate_$dev.log" 2>&1
    echo "evaluate $dev: rc=$?"
done
$PY - "$WORK/eval_cuda.jsonl" "$WORK/eval_cpu.jsonl" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
gpu, cpu = (json.loads(open(p).readline()) for p in sys.argv[1:])
print(f"evaluate step {gpu['step']}: val/loss {gpu['val/loss']:.4f} on cuda (bf16), "
      f"{cpu['val/loss']:.4f} on cpu (fp32), |diff| {abs(gpu['val/loss'] - cpu['val/loss']):.1e}; "
      f"lambada ppl {gpu['lambada/ppl']:.2f} / {cpu['lambada/ppl']:.2f}, "
      f"acc {gpu['lambada/acc']:.3f} / {cpu['lambada/acc']:.3f}")
EOF

# Exact BPTT in segments (trainer.segment_len) on the CUDA kernel: 4 steps at ctx_len 4096,
# whole and in 512-token segments; the losses must agree to bf16 rounding, the memory drop.
for seg in 0 512; do
    run="$WORK/segments$seg"
    timeout 300 $PY -m rwkv_train.train model=finch_debug "trainer=$TRAINER" trainer.precision=bf16-mixed \
        "data.path=$WORK/data" data.ctx_len=4096 data.micro_batch_size=2 data.global_batch_size=2 \
        data.val_samples=0 trainer.max_steps=4 checkpoint.every_n_steps=0 "trainer.segment_len=$seg" \
        logger=none trainer.progress_bar=false "run_dir=$run" >"$OUT/train_segments$seg.log" 2>&1
    echo "segment_len=$seg: rc=$?"
done
$PY - "$WORK/segments0/metrics.jsonl" "$WORK/segments512/metrics.jsonl" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
a, b = ([r for r in map(json.loads, open(p)) if "train/loss" in r] for p in sys.argv[1:])
diff = max(abs(x["train/loss"] - y["train/loss"]) for x, y in zip(a, b))
mem = [max(r.get("mem/max_reserved_gib", 0) for r in rs) for rs in (a, b)]
print(f"segments: losses {[round(r['train/loss'], 4) for r in b]}, max |diff| to whole "
      f"{diff:.2e}; {mem[0]:.2f} GiB reserved whole, {mem[1]:.2f} GiB in segments")
EOF
# model.compile against eager: one training step's tokens/s, Finch-1.6B-shaped (8 layers).
for flag in "" --compile; do
    timeout 240 $PY benchmarks/bench_train.py --device cuda --models finch_1.6b --layers 8 \
        --batch 2 --ctx-len 4096 --steps 3 $flag 2>&1 | tee -a "$OUT/bench_train_compile.log" \
        | grep "^| finch" | sed "s/^/bench_train ${flag:-eager}: /" | tee -a "$OUT/summary.txt"
done
exit 0
