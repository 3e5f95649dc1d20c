#!/usr/bin/env bash
# GPU smoke test (one CUDA GPU, < 10 min, no network): the paths CPU tests cannot run.
#   1. bf16 full fine-tuning, a few steps on the embedded model      (lorascope train, train.precision=bf16)
#   2. bf16 LoRA, the same steps                                       (checkpoint reloads through PEFT)
#   3. LoftQ init (bitsandbytes NF4) + bf16 LoRA                       (saved merged, as a full model)
#   4. FSDP2 on one GPU through accelerate launch, full FT and LoRA   (configs/accelerate/fsdp-gpu.yaml)
#   5. one evaluation of the LoRA run                                  (lorascope eval, held-out BPB)
#   6. LoRA dropout masks drawn on the GPU keep entries at rate 1 - p  (methods.keep_mask, CUDA generator)
#   7. whole-text scoring through the reused head buffer = the head's own logits, fp32 and bf16 (token_windows)
# Data: the first 120 modules of Python's standard library as code text (the held-out BPB uses its held-out part).
#
#   bash bench/gpu_smoke.sh [OUT_DIR]          # default: a new temporary directory
#   PYTHON=/path/to/python bash bench/gpu_smoke.sh
#   MODEL=/path/to/hf_dir bash bench/gpu_smoke.sh   # any model spec the loader accepts (default: embedded)
#
# Exits non-zero at the first failure, with the step's log; without CUDA (or bitsandbytes) it fails at once.
set -euo pipefail

PY=${PYTHON:-python}
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$(mktemp -d -t lorascope-gpu-smoke.XXXXXX)}
mkdir -p "$OUT"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"

die() { echo "error: bench/gpu_smoke.sh: $*" >&2; exit 1; }

"$PY" - <<'EOF' || die "no CUDA GPU visible to torch (torch.cuda.is_available() is False)"
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
"$PY" -c "import bitsandbytes" 2>/dev/null || die "LoftQ needs bitsandbytes (pip install 'lorascope[gpu]')"
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__,
                             '| bf16:', torch.cuda.is_bf16_supported())"

# Local data (no network): Python's own standard library as code CPT text.
"$PY" - "$OUT" <<'EOF'
import json, pathlib, sys, sysconfig
out = pathlib.Path(sys.argv[1])
files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:120]
(out / "code.jsonl").write_text("\n".join(json.dumps({"text": f.read_text(errors="ignore")[:6000]}) for f in files))
EOF

TRAIN=("model=${MODEL:-embedded}" "data.dataset=$OUT/code.jsonl" train.precision=bf16 train.seq_len=256 train.batch_size=8
       train.max_tokens=16384 "train.checkpoints=[8192]" train.save_state_every=4)
step() {  # step NAME COMMAND...: run, time it, show the log tail on failure
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name"
  if ! "$@" > "$OUT/$name.log" 2>&1; then
    tail -n 40 "$OUT/$name.log" >&2
    die "step '$name' failed (log: $OUT/$name.log)"
  fi
  echo "   ok in $((SECONDS - t0)) s"
}
check_run() {  # check_run RUN_DIR: finished, loss fell, finite
  "$PY" - "$1" <<'EOF' || die "run $1: did not finish with a falling finite loss"
import json, math, pathlib, sys
run = pathlib.Path(sys.argv[1])
s = json.loads((run / "summary.json").read_text())
assert (run / "COMPLETE").exists() and s["precision"] == "bf16", s
assert math.isfinite(s["final_loss"]) and s["final_loss"] < s["first_loss"], s
print(f"   {run.name}: loss {s['first_loss']:.3f} -> {s['final_loss']:.3f}, {s['tokens_per_s']:.0f} tok/s, "
      f"peak {s['peak_memory_bytes'] / 2**30:.2f} GiB, {s['processes']} process(es)")
EOF
}

step full-bf16 "$PY" -m lorascope train /dev/null "${TRAIN[@]}" method.kind=full train.lr=5e-5 --out "$OUT/full-bf16"
check_run "$OUT/full-bf16"
step lora-bf16 "$PY" -m lorascope train /dev/null "${TRAIN[@]}" method.kind=lora method.rank=16 train.lr=5e-4 \
  --out "$OUT/lora-bf16"
check_run "$OUT/lora-bf16"
step loftq-bf16 "$PY" -m lorascope train /dev/null "${TRAIN[@]}" method.kind=lora method.rank=16 method.init=loftq \
  train.lr=5e-4 --out "$OUT/loftq-bf16"
check_run "$OUT/loftq-bf16"

# FSDP2 on one GPU: first prove the launch really sets up FSDP (a 1-process launch could silently be plain
# single-device training), then train through it.
cat > "$OUT/fsdp_check.py" <<'EOF'
import sys
from accelerate import Accelerator
acc = Accelerator()
assert acc.distributed_type.name == "FSDP" and acc.is_fsdp2, acc.distributed_type
print("   accelerate:", acc.distributed_type.name, "v2, device", acc.device)
EOF
ACC=("$PY" -m accelerate.commands.launch --config_file "$REPO/configs/accelerate/fsdp-gpu.yaml" --num_processes 1)
step fsdp-setup "${ACC[@]}" "$OUT/fsdp_check.py"
step fsdp-full-bf16 "${ACC[@]}" -m lorascope train /dev/null "${TRAIN[@]}" method.kind=full train.lr=5e-5 \
  --out "$OUT/fsdp-full-bf16"
check_run "$OUT/fsdp-full-bf16"
step fsdp-lora-bf16 "${ACC[@]}" -m lorascope train /dev/null "${TRAIN[@]}" method.kind=lora method.rank=16 \
  train.lr=5e-4 --out "$OUT/fsdp-lora-bf16"
check_run "$OUT/fsdp-lora-bf16"
"$PY" - "$OUT" <<'EOF' || die "FSDP run: loss curve differs from the single-process bf16 run"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
curve = lambda r: [json.loads(l)["loss"] for l in (out / r / "loss.jsonl").read_text().splitlines()]
for kind in ("full", "lora"):
    a, b = curve(f"{kind}-bf16"), curve(f"fsdp-{kind}-bf16")
    d = max(abs(x - y) for x, y in zip(a, b))
    print(f"   FSDP vs plain bf16 {kind}: max |loss diff| = {d:.3g} over {len(a)} steps (bf16 smoke tolerance 0.1)")
    assert len(a) == len(b) and d < 0.1
EOF

step eval-lora "$PY" -m lorascope eval "$OUT/lora-bf16" --tasks "heldout_bpb:$OUT/code.jsonl" --limit 20 \
  --out "$OUT/eval-lora"
"$PY" - "$OUT/eval-lora/results.json" <<'EOF' || die "eval: no finite bpb in results.json"
import json, math, sys
r = json.load(open(sys.argv[1]))
(task,) = r["tasks"]
bpb = r["tasks"][task]["metrics"]["bpb"]
assert math.isfinite(bpb) and bpb > 0, bpb
print(f"   {task}: bpb {bpb:.3f}")
EOF
"$PY" - <<'EOF' || die "keep_mask on CUDA: keep rate off by more than 4 standard errors"
import torch
from lorascope.train.methods import keep_mask
torch.manual_seed(0)
x = torch.empty(4096, 4096, device="cuda", dtype=torch.bfloat16)
for p in (0.05, 0.5, 0.999):
    rate = keep_mask(x, p).float().mean().item()
    se = (p * (1 - p) / x.numel()) ** 0.5
    print(f"   keep_mask p={p}: kept {rate:.6f} (want {1 - p:.6f}, {abs(rate - 1 + p) / se:.1f} s.e.)")
    assert abs(rate - (1 - p)) < 4 * se
EOF
"$PY" - "${MODEL:-embedded}" "$OUT/code.jsonl" <<'EOF' || die "scoring through the reused head buffer differs from the head's own"
import json, sys, torch
from lorascope.models import load_base
from lorascope.evals import bpb, kl, token_windows
texts = [json.loads(l)["text"] for l in open(sys.argv[2])][:48]
own = lambda model, n: token_windows.reused_head_output(model, 0)  # 0 rows: the head's own forward
for dtype in (torch.float32, torch.bfloat16):
    m, tok = load_base(sys.argv[1], dtype)
    ref, _ = load_base(sys.argv[1], dtype)
    m, ref = m.cuda(), ref.cuda()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    got = [bpb.text_nll(m, tok, texts), kl.kl_per_text(m, ref, tok, texts[:16], cache=False)]
    bpb.reused_head_output = kl.reused_head_output = own
    want = [bpb.text_nll(m, tok, texts), kl.kl_per_text(m, ref, tok, texts[:16], cache=False)]
    bpb.reused_head_output = kl.reused_head_output = token_windows.reused_head_output
    print(f"   reused head buffer, {dtype}: {sum(n for _, n in got[0])} tokens, NLL and KL equal: {got == want}")
    assert got == want
EOF
echo "gpu smoke: all steps passed ($SECONDS s); outputs in $OUT"
