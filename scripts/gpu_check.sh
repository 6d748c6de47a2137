#!/usr/bin/env bash
# The CUDA checks, as one script: run it on a machine with a GPU, from the repository root, in an
# environment where capcli is installed (pip install -e ".[test]"). Offline is fine: the full-size
# model is built with random weights (speed does not depend on their values).
#
#   scripts/gpu_check.sh [OUT_DIR]        # default OUT_DIR: gpu-check/; PYTHON=... picks the interpreter
#
# It writes, into OUT_DIR:
#   pytest-gpu.log                     pytest -m gpu: bf16 and fp16 training, GradScaler resume, CUDA → CPU
#   bench-bf16.json, bench-fp16.json   capcli benchmark --model clip-gpt2 --device cuda at each precision
#   bench-tiny-bf16.json               the tiny preset on the same card
#   train-{bf16,fp16}.log              50 pretrain steps of clip-gpt2: the bf16 path and the GradScaler path
#   plain/, ddp1/                      the tiny preset without torchrun, and under torchrun on 1 GPU (NCCL)
#   steps.txt, summary.txt             each step's exit and time; the figures docs/performance.md quotes,
#                                      with PASS/FAIL lines
# A failed step is reported and the others still run; the script exits 1 if any step failed.
set -uo pipefail
out="${1:-gpu-check}"
mkdir -p "$out"
export CAPCLI_DATA__CACHE_DIR="$out/data"
py="${PYTHON:-python3}"  # the interpreter that has capcli installed; some systems have no plain `python`
failed=0

step() {  # step NAME COMMAND...: run it with its output in NAME.log, and record its exit and time
  local name=$1 start=$SECONDS code=0
  shift
  timeout "${STEP_TIMEOUT:-900}" "$@" > "$out/$name.log" 2>&1 || code=$?
  echo "$name: exit $code after $((SECONDS - start)) s" | tee -a "$out/steps.txt"
  [ "$code" -eq 0 ] || failed=1
}

step pytest-gpu "$py" -m pytest -m gpu tests/test_cuda.py -q -p no:cacheprovider

# A full-size GPT-2 (124M) with random weights and a byte-level BPE, saved as a local decoder
# directory: clip-gpt2 then loads it through the same path as downloaded weights.
step gpt2-random "$py" - "$out/gpt2-random" <<'EOF'
import sys
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from capcli.data.synthetic import generate

path = sys.argv[1]
texts = [c for i in range(500) for c in generate("train", i, seed=0)[1]]
bpe = Tokenizer(models.BPE())
bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
bpe.decoder = decoders.ByteLevel()
bpe.train_from_iterator(texts, trainer=trainers.BpeTrainer(
    vocab_size=1000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
torch.manual_seed(0)
GPT2LMHeadModel(GPT2Config()).save_pretrained(path)  # GPT-2's own sizes: 12 layers, 768 wide, 50257 tokens
tokenizer.save_pretrained(path)
EOF
export CAPCLI_MODEL__VISION_WEIGHTS=none CAPCLI_MODEL__DECODER="$out/gpt2-random"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/card.txt"

step bench-bf16 capcli benchmark --model clip-gpt2 --device cuda --precision bf16 --batch-size 128 \
  --sections pretrain,align,caption --json --quiet --out "$out/bench-bf16.json"

# The two mixed-precision training paths: the loss must fall over 50 steps.
for precision in bf16 fp16; do
  step "train-$precision" capcli pretrain --model clip-gpt2 --device cuda --precision "$precision" \
    --max-steps 50 --epochs 1 --batch-size 32 --train-size 1600 --val-size 64 --test-size 64 --lr 1e-4 \
    --output "$out/run-$precision" --overwrite --quiet --json
done

# The DDP path on one GPU (torchrun, NCCL, world size 1) against a plain run: the same losses.
unset CAPCLI_MODEL__VISION_WEIGHTS CAPCLI_MODEL__DECODER
export CAPCLI_PRETRAIN__ENGINE__LOG_EVERY=1  # every step's loss is compared, not every tenth
tiny=(--device cuda --precision fp32 --epochs 1 --max-steps 20 --train-size 1280 --val-size 64 --test-size 64 --quiet)
step plain capcli pretrain "${tiny[@]}" --output "$out/plain" --overwrite
step ddp1 torchrun --standalone --nproc-per-node 1 -m capcli pretrain "${tiny[@]}" --output "$out/ddp1" --overwrite

# The same benchmark with fp16 and the GradScaler, and the tiny preset on the same card.
unset CAPCLI_PRETRAIN__ENGINE__LOG_EVERY
step bench-tiny-bf16 capcli benchmark --device cuda --precision bf16 --sections pretrain,align,caption --json \
  --quiet --out "$out/bench-tiny-bf16.json"
export CAPCLI_MODEL__VISION_WEIGHTS=none CAPCLI_MODEL__DECODER="$out/gpt2-random"
step bench-fp16 capcli benchmark --model clip-gpt2 --device cuda --precision fp16 --batch-size 128 \
  --sections pretrain,align,caption --json --quiet --out "$out/bench-fp16.json"

"$py" - "$out" <<'EOF' | tee "$out/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])


def train_losses(run: str) -> list[float]:
    rows = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def report(what, check):  # a step that failed leaves files missing: say so and go on
    try:
        check()
    except (OSError, ValueError, KeyError) as error:
        print(f"{what}: MISSING ({type(error).__name__}: {error})")


report("card", lambda: print("card:", (out / "card.txt").read_text().strip()))
report("steps", lambda: print((out / "steps.txt").read_text().strip()))
keys = ["mfu", "align_mfu", "peak_flops", "pretrain_samples_per_s", "pretrain_speedup", "align_samples_per_s",
        "align_cache_speedup", "caption_beam5_speedup", "caption_beam5_images_per_s", "caption_beam5_agreement",
        "pretrain_peak_memory_mb", "align_peak_memory_mb"]
for name in ("bench-bf16", "bench-fp16", "bench-tiny-bf16"):
    def bench(name=name):
        d = json.loads((out / f"{name}.json").read_text())
        print(name, {k: round(d[k], 4) for k in keys if k in d})
    report(name, bench)
for precision in ("bf16", "fp16"):
    def train(precision=precision):
        losses = train_losses(f"run-{precision}")
        first, last = losses[0], losses[-1]
        print(f"{precision} training: loss {first:.3f} -> {last:.3f}", "PASS" if last < first else "FAIL")
    report(f"{precision} training", train)


def ddp():
    plain, ddp1 = train_losses("plain"), train_losses("ddp1")
    gap = max(abs(a - b) / max(abs(a), 1e-8) for a, b in zip(plain, ddp1))
    print(f"DDP (NCCL, 1 rank) vs plain: {len(ddp1)} logged losses, largest relative gap {gap:.2e}",
          "PASS" if len(plain) == len(ddp1) and gap < 1e-4 else "FAIL")


report("DDP", ddp)
EOF
exit "$failed"
