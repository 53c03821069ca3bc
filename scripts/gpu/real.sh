#!/usr/bin/env bash
# On the GPU machine: the real-data benchmark (benchmarks/bench_real.py) on PandaSet 002 at 960x540.
# The sequence is carried packed (scripts/gpu/pack_pandaset.py, 64 MiB a call): .gpu_data/<part>/ folders are
# unpacked into /tmp/pandaset/002 by "unpack"; the machine keeps /tmp while it stays warm between calls.
#   bash scripts/gpu/real.sh unpack                       # every .gpu_data/*/ carried in this call
#   bash scripts/gpu/real.sh train NAME SECONDS [ns-train options...]   # leave-one-camera-out training (front held out)
#   bash scripts/gpu/real.sh eval RUN [RUN...]            # (a) seed cloud, (c) ours: every held-out front image
#   bash scripts/gpu/real.sh splatfacto RUN [BUDGETS...]  # (b) splatfacto on the front camera's even frames
#   STEPS="100 200" bash scripts/gpu/real.sh trace RUN...  # opacity / scale / colour / PSNR over the checkpoints
#   bash scripts/gpu/real.sh curves RUN [BUDGETS...]     # issue 17: splatfacto and fine-tuning from ours side by side
#   bash scripts/gpu/real.sh keep RUN                     # the trained run's config + weights in <= 15-MiB parts
#                                                         # ($OUT/keep_RUN/; here put them in .gpu_data/keep_RUN/;
#                                                         # "train" does this at its end unless KEEP=0)
#   bash scripts/gpu/real.sh restore                      # a later session: every carried .gpu_data/keep_*/ back
#                                                         # under /tmp/real_runs, instead of training again (~330 s)
#   SWEEP="--variant default --variant fast pipeline.model.refine_every=50 --variant win bake=windows" \
#       bash scripts/gpu/real.sh variants RUN [BUDGETS...]  # fine-tuning variants one after the other, each alone on
#                                                         # the GPU, in one process (the model is loaded and the scene
#                                                         # exported once); the JSON is rewritten after each variant
# Packing that fits 64 MiB a call with the wheels (session 10; tracked files ~9 MiB, .whl 33, .whl_real 13 MiB):
#   here: P="python scripts/gpu/pack_pandaset.py pack data/pandaset/002"
#         $P .gpu_data/p1 --downscale 2 --quality 85 --cameras front --no-lidar       # call 1: .whl .whl_real p1
#         $P .gpu_data/p2 --downscale 2 --quality 85 --cameras front_left front_right left right --every 2 --radius 80
#         $P .gpu_data/p3 --downscale 2 --quality 85 --cameras back --no-lidar        # call 3: p3, then train
#   (.whl_real: pandas + python-dateutil, pytz, tzdata, six as Python 3.12 wheels; the LiDAR unpack writes pandas
#   pickles.) Make the calls back to back: the machine keeps /tmp (data, trained runs) only ~30 s after a call.
# Results under $OUT (default outputs/real).
source scripts/gpu/env.sh
RES=${OUT:-outputs/real}
RUNS=/tmp/real_runs
mkdir -p "$RES"
case "$1" in
unpack)  # each carried part once (the warm machine keeps /tmp between calls)
    for d in .gpu_data/*/; do
        mark=/tmp/pandaset/.unpacked_$(basename "$d")
        [ -f "$mark" ] || { python3 scripts/gpu/pack_pandaset.py unpack "$d" /tmp/pandaset/002 && touch "$mark"; }
    done
    python3 benchmarks/bench_real.py split --sequence /tmp/pandaset/002 --out /tmp/pd_cams
    du -sh /tmp/pandaset/002/* ;;
train)
    name=$2; secs=$3; shift 3
    # scenes (sorted): 0 back, 1 front, 2 front_left, 3 front_right, 4 left, 5 right: train on all but the front
    # (EVAL_ID: the front's index when fewer cameras were carried)
    timeout "$secs" python3 -m nerfstudio.scripts.train evolsplat-ff --data /tmp/pd_cams \
        --pipeline.datamanager.dataparser.layout pandaset --pipeline.datamanager.dataparser.eval-scene-ids ${EVAL_ID:-1} \
        --pipeline.model.pointcloud.generator lidar --pipeline.model.pointcloud-cache-dir /tmp/pd_cache \
        --pipeline.datamanager.dataparser.lidar-cache-dir /tmp/pd_cache/lidar \
        --output-dir $RUNS --experiment-name "$name" --timestamp run --vis tensorboard \
        --max-num-iterations 100000 --steps-per-save ${SAVE_EVERY:-100} --save-only-latest-checkpoint False \
        --steps-per-eval-batch 100000 --steps-per-eval-image 100000 --steps-per-eval-all-images 1000000 \
        --viewer.quit-on-train-completion True "$@" > "$RES/train_$name.log" 2>&1
    echo "train $name: exit $? (124 = stopped at $secs s); checkpoints:"; ls $RUNS/$name/evolsplat-ff/run/nerfstudio_models | tail -3
    grep -v -i "warn" "$RES/train_$name.log" | tail -4
    # the model comes back with the call's files, for "restore" in a later session (KEEP=0: not)
    [ "${KEEP:-1}" = 0 ] || python3 scripts/gpu/keep_run.py pack "$RUNS/$name/evolsplat-ff/run" "$RES/keep_$name" ;;
keep)  # scripts/gpu/keep_run.py: pipeline state only (evaluation and fine-tuning load nothing else)
    python3 scripts/gpu/keep_run.py pack "$RUNS/$2/evolsplat-ff/run" "$RES/keep_$2" ${STEP:+--step $STEP} ;;
restore)  # the config's own paths (/tmp/real_runs/RUN/evolsplat-ff/run): the commands below find it by RUN
    for d in .gpu_data/keep_*/; do python3 scripts/gpu/keep_run.py unpack "$d"; done ;;
eval)
    shift
    cfgs=(); for r in "$@"; do cfgs+=("$RUNS/$r/evolsplat-ff/run/config.yml"); done
    python3 benchmarks/bench_real.py eval --load-config "${cfgs[@]}" --out "$RES" ${STEP:+--step $STEP} > "$RES/eval.log" 2>&1
    echo "eval exit $?"; grep -v -i "warn" "$RES/eval.log" | tail -40 ;;
trace)  # STEPS="100 200 ..." bash scripts/gpu/real.sh trace RUN [RUN...]
    shift
    cfgs=(); for r in "$@"; do cfgs+=("$RUNS/$r/evolsplat-ff/run/config.yml"); done
    python3 benchmarks/bench_real.py trace --load-config "${cfgs[@]}" --steps $STEPS --out "$RES" > "$RES/trace.log" 2>&1
    echo "trace exit $?"; grep -v -i "warn" "$RES/trace.log" | tail -30 ;;
splatfacto)
    run=$2; shift 2
    python3 benchmarks/bench_real.py splatfacto --load-config "$RUNS/$run/evolsplat-ff/run/config.yml" \
        --budgets ${@:-30 300} --out /tmp/real_splatfacto > "$RES/splatfacto.log" 2>&1
    echo "splatfacto exit $?"; grep -v -i "warn" "$RES/splatfacto.log" | tail -30
    cp /tmp/real_splatfacto/*.json /tmp/real_splatfacto/*.png "$RES/" 2>/dev/null ;;
curves)  # one process per method, same images and views, each on its own clock; merged + plotted afterwards
    run=$2; shift 2
    for m in splatfacto finetune; do
        python3 benchmarks/bench_real.py splatfacto --load-config "$RUNS/$run/evolsplat-ff/run/config.yml" \
            --methods $m --budgets ${@:-10 30 60 300} --images 2 --out /tmp/real_$m ${FT_OPTS:+--ft-option $FT_OPTS} \
            > "$RES/curves_$m.log" 2>&1 &
        sleep 2
    done
    wait
    python3 benchmarks/bench_splatfacto.py --merge /tmp/real_splatfacto/bench_real_splatfacto.json \
        /tmp/real_finetune/bench_real_splatfacto.json --out "$RES"
    python3 -c "import json; r=json.load(open('$RES/bench_splatfacto.json'))['scenes']
for s,row in r.items(): print(s, round(row['evolsplat_ff']['psnr'],2), {k: (round(v['psnr'],2), v.get('steps')) for k,v in row.items() if k.startswith('splatfacto_')},
    [(round(p['seconds']), p['steps'], round(p['psnr'],2)) for p in row.get('finetune_curve', [])])"
    grep -v -i warn "$RES/curves_finetune.log" | tail -3
    for m in splatfacto finetune; do cp /tmp/real_$m/real_splatfacto_*_view00.png "$RES/real_${m}_view00.png" 2>/dev/null; done ;;
variants)  # SWEEP: bench_real.py --variant options (default: the default start and the windows start)
    run=$2; shift 2
    rm -f /tmp/realv/bench_real_splatfacto.json  # a failed sweep must not report the previous call's results
    python3 benchmarks/bench_real.py splatfacto --load-config "$RUNS/$run/evolsplat-ff/run/config.yml" \
        --methods finetune --budgets ${@:-30 60} --images 1 --out /tmp/realv \
        ${SWEEP:---variant default --variant windows bake=windows} > "$RES/variants.log" 2>&1
    echo "variants exit $?"; cp /tmp/realv/bench_real_splatfacto.json "$RES/variants.json" 2>/dev/null
    python3 -c "import json; r=json.load(open('/tmp/realv/bench_real_splatfacto.json'))['scenes']
for s,row in r.items():
    for k,c in row.items():
        if k.startswith('finetune_curve'): print(k[15:] or 'default', s, [(round(p['seconds']), p['steps'], round(p['psnr'],2), round(p['ssim'],3)) for p in c])
        if k.startswith('finetune_error'): print(k[15:], s, c)" | tee -a "$RES/variants.txt" ;;
esac
