#!/usr/bin/env bash
# The CUDA check: the test suite's GPU-marked tests and `lageo bench` on a GPU, every figure in one JSON file.
#
#   scripts/gpu_check.sh [OUT.json]        default OUT: outputs/gpu_check.json; a few minutes on one GPU
#
# Figures: embedding images/s (raw model and files -> loader -> model) at float32 and at bfloat16 autocast,
# each strategy's training images/s, peak GPU memory of each, the machine, and the tests' outcome.
# Settings (environment): PYTHON (default .venv/bin/python, else python3), MODEL (ViT-B-32; random weights:
# throughput does not depend on their values), EMBED_IMAGES (512), EMBED_BATCH (128), TRAIN_IMAGES (256),
# TRAIN_BATCH (64), DEVICE (cuda; DEVICE=cpu runs the same steps on a machine without CUDA, as a dry run of
# this script: the GPU tests then skip and the figures are CPU figures).
# Exit status: 0 everything passed; 1 a test or a benchmark failed (the JSON says which); 2 no CUDA here.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT=${1:-outputs/gpu_check.json}
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-ViT-B-32}
EMBED_IMAGES=${EMBED_IMAGES:-512}
EMBED_BATCH=${EMBED_BATCH:-128}
TRAIN_IMAGES=${TRAIN_IMAGES:-256}
TRAIN_BATCH=${TRAIN_BATCH:-64}

if [[ "$DEVICE" != cpu ]] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device here ($PYTHON: torch.cuda.is_available() is False, or torch does not import):" \
       "nothing was checked. Run this on a machine with an NVIDIA GPU (DEVICE=cpu runs a dry run on the CPU)." >&2
  exit 2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
: > "$work/steps.tsv"

# step NAME COMMAND...: run it, keep its stdout (JSON) and log, record its exit code and seconds.
step() {
  local name=$1 start code
  shift
  echo "gpu_check: $name ..." >&2
  start=$(date +%s)
  "$@" > "$work/$name.out" 2> "$work/$name.log"
  code=$?
  printf '%s\t%s\t%s\n' "$name" "$code" "$(( $(date +%s) - start ))" >> "$work/steps.tsv"
  if [[ $code -ne 0 ]]; then
    status=1
    echo "gpu_check: $name failed (exit $code); the end of its log:" >&2
    tail -n 25 "$work/$name.log" >&2
  fi
}

bench=("$PYTHON" -m lageo_utils.cli bench)
step tests "$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml "$work/tests.xml" tests
step embed_fp32 "${bench[@]}" embed --model "$MODEL" --device "$DEVICE" --precision fp32 \
  --images "$EMBED_IMAGES" --batch-size "$EMBED_BATCH"
step embed_bf16 "${bench[@]}" embed --model "$MODEL" --device "$DEVICE" --precision bf16 \
  --images "$EMBED_IMAGES" --batch-size "$EMBED_BATCH"
step train "${bench[@]}" train --model "$MODEL" --device "$DEVICE" --strategy all \
  --images "$TRAIN_IMAGES" --batch-size "$TRAIN_BATCH"

mkdir -p "$(dirname "$OUT")"
"$PYTHON" - "$work" "$OUT" "$DEVICE" <<'EOF' || status=1
"""Gather the steps' JSON, the tests' outcome and the machine into one file."""
import json
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

work, out, device = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
steps = {}
for line in (work / "steps.tsv").read_text().splitlines():
    name, code, seconds = line.split("\t")
    text = (work / f"{name}.out").read_text()
    entry = {"exit_code": int(code), "seconds": int(seconds)}
    if name != "tests":
        try:
            entry["result"] = json.loads(text)
        except json.JSONDecodeError:
            entry["log_tail"] = (work / f"{name}.log").read_text()[-2000:]
    steps[name] = entry
tests = {"exit_code": steps["tests"]["exit_code"]}
if (work / "tests.xml").exists():
    suite = ET.parse(work / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests.update({key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")})
    tests["cases"] = [{"name": f"{case.get('classname')}::{case.get('name')}",
                       "outcome": next((child.tag for child in case if child.tag in ("failure", "error", "skipped")),
                                       "passed"), "seconds": float(case.get("time", 0))}
                      for case in suite.iter("testcase")]
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
except (OSError, subprocess.SubprocessError):
    smi = []
cuda = torch.cuda.is_available()
doc = {
    "machine": {
        "device": device, "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda
        else [], "nvidia_smi": smi, "bf16_supported": cuda and torch.cuda.is_bf16_supported(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda
        else None, "python": platform.python_version(), "cpu_count": __import__("os").cpu_count(),
        "platform": platform.platform(),
    },
    "tests": tests,
    "embedding": {precision: steps[f"embed_{precision}"].get("result") for precision in ("fp32", "bf16")},
    "training": steps["train"].get("result"),
    "steps": {name: {k: v for k, v in entry.items() if k != "result"} for name, entry in steps.items()},
}
out.write_text(json.dumps(doc, indent=2) + "\n")
embed = doc["embedding"]
print(f"gpu_check: wrote {out}")
for precision, figures in embed.items():
    if figures:
        print(f"  embedding {precision}: raw {figures['raw_model_img_s']} img/s, pipeline {figures['pipeline_img_s']} "
              f"img/s, peak GPU {figures.get('peak_gpu_mb')} MB")
for figures in doc["training"] or []:
    print(f"  training {figures['strategy']}: {figures['train_img_s']} img/s, peak GPU {figures['peak_gpu_mb']} MB")
print(f"  tests: {json.dumps({k: v for k, v in tests.items() if k != 'cases'})}")
if device != "cpu" and tests.get("skipped"):
    sys.exit(f"gpu_check: {tests['skipped']} GPU tests skipped on a CUDA machine (see {out}, tests.cases)")
EOF

exit $status
