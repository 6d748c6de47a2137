#!/usr/bin/env bash
# The CUDA checks, as one script: run it on a machine with a GPU, from the repository root, in an
# environment where capcli is installed (pip install -e .). Offline is fine: the full-size model
# is built with random weights (speed does not depend on their values).
#
#   scripts/gpu_check.sh [OUT_DIR]        # default OUT_DIR: gpu-check/
#
# It writes, into OUT_DIR:
#   bench-bf16.json, bench-fp16.json   capcli benchmark --model clip-gpt2 --device cuda at each precision
#   bench-tiny-bf16.json               the tiny preset on the same card
#   train-{bf16,fp16}.json             50 pretrain steps of clip-gpt2: the bf16 path and the GradScaler path
#   plain/, ddp1/                      the tiny preset without torchrun, and under torchrun on 1 GPU (NCCL)
#   summary.txt                        the figures that docs/performance.md quotes, and PASS/FAIL lines
set -euo pipefail
out="${1:-gpu-check}"
mkdir -p "$out"
export CAPCLI_DATA__CACHE_DIR="$out/data"

# A full-size GPT-2 (124M) with random weights and a byte-level BPE, saved as a local decoder
# directory: clip-gpt2 then loads it through the same path as downloaded weights.
python - "$out/gpt2-random" <<'EOF'
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

for precision in bf16 fp16; do
  capcli benchmark --model clip-gpt2 --device cuda --precision "$precision" --batch-size 128 \
    --sections pretrain,align,caption --json --quiet --out "$out/bench-$precision.json" > /dev/null
done
(unset CAPCLI_MODEL__VISION_WEIGHTS CAPCLI_MODEL__DECODER
 capcli benchmark --device cuda --precision bf16 --json --quiet --out "$out/bench-tiny-bf16.json" > /dev/null)

# The two mixed-precision training paths: the loss must fall over 50 steps.
for precision in bf16 fp16; do
  capcli pretrain --model clip-gpt2 --device cuda --precision "$precision" --max-steps 50 --epochs 1 \
    --batch-size 64 --train-size 3200 --val-size 64 --test-size 64 --lr 1e-4 \
    --output "$out/run-$precision" --overwrite --quiet --json > "$out/train-$precision.json"
done

# The DDP path on one GPU (torchrun, NCCL, world size 1) against a plain run: the same losses.
(unset CAPCLI_MODEL__VISION_WEIGHTS CAPCLI_MODEL__DECODER
 tiny=(--device cuda --precision fp32 --epochs 1 --max-steps 20 --train-size 1280 --val-size 64 --test-size 64 --quiet)
 capcli pretrain "${tiny[@]}" --output "$out/plain" --overwrite > /dev/null
 torchrun --standalone --nproc-per-node 1 -m capcli pretrain "${tiny[@]}" --output "$out/ddp1" --overwrite > /dev/null)

python - "$out" <<'EOF' | tee "$out/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("card:", (out / "card.txt").read_text().strip())
for name in ("bench-bf16", "bench-fp16", "bench-tiny-bf16"):
    d = json.loads((out / f"{name}.json").read_text())
    keys = ["mfu", "peak_flops", "pretrain_samples_per_s", "pretrain_speedup", "align_cache_speedup",
            "caption_beam5_speedup", "caption_beam5_images_per_s", "pretrain_peak_memory_mb"]
    print(name, {k: round(d[k], 4) for k in keys if k in d})
for precision in ("bf16", "fp16"):
    rows = [json.loads(line) for line in (out / f"run-{precision}" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    first, last = losses[0], losses[-1]
    print(f"{precision} training: loss {first:.3f} -> {last:.3f}", "PASS" if last < first else "FAIL")
runs = {}
for name in ("plain", "ddp1"):
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    runs[name] = [r["loss"] for r in rows if r["split"] == "train"]
gap = max(abs(a - b) / max(abs(a), 1e-8) for a, b in zip(runs["plain"], runs["ddp1"]))
print(f"DDP (NCCL, 1 rank) vs plain: {len(runs['ddp1'])} logged losses, largest relative gap {gap:.2e}",
      "PASS" if len(runs["plain"]) == len(runs["ddp1"]) and gap < 1e-4 else "FAIL")
EOF
