#!/usr/bin/env bash
# The CUDA paths end to end, then the GPU figures, in one run that fits a short GPU lease:
#   train (AMP, the quick-start recipe on a time budget) -> val (fp32 and --half) -> detect (--half,
#   video) -> export (TorchScript, ONNX) -> inference images/s by batch -> training images/s.
# Each step has its own time limit and log; a failed step does not stop the next. Summary at the end.
#
#   bash tools/gpu_check.sh [OUT_DIR]                    # on a CUDA machine (DEVICE=0)
#   DEVICE=cpu TRAIN_HOURS=0.003 QUICK=1 bash tools/gpu_check.sh /tmp/gpu_dry   # dry run of the commands
set -u
out=${1:-runs/gpu_check}
device=${DEVICE:-0}
train_hours=${TRAIN_HOURS:-0.03}
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
log="$out/all.log"
summary="$out/summary.txt"
: >"$log"
: >"$summary"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, append its output to the log
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    echo "===== $name: $*" >>"$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    rc=$?
    echo "$name: rc $rc, $(($(date +%s) - t0)) s" | tee -a "$summary"
}

if [[ -n ${QUICK:-} ]]; then  # dry run: smallest sizes, no compile
    bench_img=64 batches="1 2" compile=--no-compile train_batch=4 workers=2
else
    bench_img=640 batches="1 16 64" compile="" train_batch=64 workers=8
fi
w=runs/train/gpu_check/weights/best.pt

step env 60 bash -c "nvidia-smi -L; $py -c 'import torch, cv2; print(torch.__version__, cv2.__version__, \
torch.cuda.is_available() and torch.cuda.get_device_name(0))'"
step train "$(awk "BEGIN { print int($train_hours * 3600) + 240 }")" $py train.py --data shapes.yaml --cfg yolov5-resnet50-cbam.yaml \
    --img 128 --time "$train_hours" --batch-size 16 --hyp hyp.quickstart.yaml --optimizer AdamW \
    --device "$device" --workers "$workers" --name gpu_check --exist-ok
cp runs/train/gpu_check/results.csv runs/train/gpu_check/results.png "$out/" 2>/dev/null
step val-fp32 90 $py val.py --weights "$w" --data shapes.yaml --img 128 --device "$device"
step val-half 90 $py val.py --weights "$w" --data shapes.yaml --img 128 --device "$device" --half
step detect-half 90 $py detect.py --weights "$w" --source ../datasets/shapes/demo --img 128 --conf-thres 0.1 \
    --device "$device" --half --name gpu_check --exist-ok
cp "$(ls runs/detect/gpu_check/*.jpg 2>/dev/null | head -1)" "$out/detect_sample.jpg" 2>/dev/null
cp runs/detect/gpu_check/shapes.mp4 "$out/" 2>/dev/null
step export 120 $py export.py --weights "$w" --include torchscript onnx --img 128 --device "$device"
step val-torchscript 90 $py val.py --weights "${w%.pt}.torchscript" --data shapes.yaml --img 128 --device "$device"
# shellcheck disable=SC2086  # $batches and $compile are word lists
step throughput-r50 240 $py benchmarks.py --throughput --device "$device" --img "$bench_img" --batches $batches \
    $compile --cfg yolov5-resnet50-cbam.yaml
# shellcheck disable=SC2086
step throughput-v5s 90 $py benchmarks.py --throughput --device "$device" --img "$bench_img" --batches $batches \
    --no-compile --cfg yolov5s.yaml
for fmt in contiguous channels_last; do
    step "train-speed-$fmt" 150 $py benchmarks.py --train-speed --device "$device" --img 320 \
        --batch-size "$train_batch" --workers "$workers" --memory-format "$fmt" \
        --cfg yolov5-resnet50-cbam.yaml yolov5s.yaml
done

echo "===== figures"
grep -E "epochs completed|^ +all |images/s by batch|^(fp32|AMP|variant)|^Training " "$log"
echo "===== summary"
cat "$summary"
