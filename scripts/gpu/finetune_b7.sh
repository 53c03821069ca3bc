#!/usr/bin/env bash
# On the GPU machine (issue 17): per-scene optimisation against wall-clock time on a held-out synthetic scene.
#   bash scripts/gpu/finetune_b7.sh train          # N_SCENES (6) synthetic streets at 192x576, evolsplat-ff STEPS (600)
#   bash scripts/gpu/finetune_b7.sh bench [BUDGETS...]   # default 10 30 60 300, on the last (held-out) scene
#   (FT_OPTS="pipeline.model.reset_alpha_every=1000 ...": evolsplat-ft options of the fine-tuning run)
#   bash scripts/gpu/finetune_b7.sh variants [BUDGETS...]   # default 10 30 60: fine-tuning variants side by side
#   (VARIANTS: ";"-separated, each "NAME:bench_splatfacto options", e.g. the default below; all share the GPU alike,
#    or with SOLO=1 run one after the other, each alone on the GPU; SAVE_FF=1 also copies the evolsplat-ff run to $OUT)
# "bench" runs splatfacto (from the scene's seed cloud) and fine-tuning (from the merged feed-forward Gaussians) side
# by side, one process each, on the same training images and held-out views, each on its own clock (evaluation
# excluded), then merges both into bench_splatfacto.json + psnr_vs_seconds.png. Each process reports its steps per
# budget, so the effect of sharing the GPU can be read against solo runs. Results into $OUT.
source scripts/gpu/env.sh
RES=${OUT:-outputs/finetune_b7}
DATA=/tmp/ft_synthetic
RUN=/tmp/ft_runs
CFG=$RUN/ft/evolsplat-ff/run/config.yml
mkdir -p "$RES"
start=$(date +%s)
case "${1:-train}" in
train)
    python3 -m evolsplat_ns.cli.synth --out $DATA --seed 0 --num-scenes ${N_SCENES:-6} --height 192 --width 576 \
        --frames 40 > "$RES/synth.log" 2>&1 || { tail -5 "$RES/synth.log"; exit 1; }
    python3 -m nerfstudio.scripts.train evolsplat-ff --data $DATA --max-num-iterations ${STEPS:-600} \
        --output-dir $RUN --experiment-name ft --timestamp run --vis tensorboard \
        --viewer.quit-on-train-completion True --pipeline.datamanager.num-target-keyframes 2 --steps-per-save 1000 \
        --pipeline.model.pointcloud.outlier-removal False --pipeline.model.pointcloud.max-points 300000 \
        > "$RES/train.log" 2>&1
    echo "train exit $? after $(( $(date +%s) - start )) s"; grep -v -i warn "$RES/train.log" | tail -3
    if [ -n "$SAVE_FF" ]; then mkdir -p "$RES/ff_run"; cp $CFG $RUN/ft/evolsplat-ff/run/nerfstudio_models/*.ckpt "$RES/ff_run/"; fi ;;
bench)
    shift; BUDGETS=("$@"); [ ${#BUDGETS[@]} -eq 0 ] && BUDGETS=(10 30 60 300)
    for m in splatfacto finetune; do
        python3 benchmarks/bench_splatfacto.py --load-config $CFG --methods $m --budgets "${BUDGETS[@]}" \
            --scenes 1 --images 2 --out /tmp/ft_$m ${FT_OPTS:+--ft-option $FT_OPTS} > "$RES/$m.log" 2>&1 &
        sleep 2
    done
    wait
    echo "bench done after $(( $(date +%s) - start )) s"; grep -h "s {" "$RES"/splatfacto.log | tail -4
    python3 benchmarks/bench_splatfacto.py --merge /tmp/ft_splatfacto/bench_splatfacto.json \
        /tmp/ft_finetune/bench_splatfacto.json --out "$RES"
    python3 -c "import json,sys; r=json.load(open('$RES/bench_splatfacto.json'))['scenes']
for s,row in r.items(): print(s, {k: (round(v['psnr'],2), v.get('steps')) for k,v in row.items() if k.startswith('splatfacto_')},
    [(round(p['seconds']), p['steps'], round(p['psnr'],2)) for p in row.get('finetune_curve', [])])"
    for m in splatfacto finetune; do cp /tmp/ft_$m/b7b_scene*_view00.png "$RES/${m}_view00.png" 2>/dev/null; done ;;
variants)  # the A/B of docs/BENCHMARKS.md (issue 17): what the fine-tuning start and schedule should be
    shift; BUDGETS=("$@"); [ ${#BUDGETS[@]} -eq 0 ] && BUDGETS=(10 30 60)
    V=${VARIANTS:-"default:;noreset:--ft-option pipeline.model.reset_alpha_every=1000000;sources:--bake sources;both:--bake sources --ft-option pipeline.model.reset_alpha_every=1000000"}
    IFS=';' read -ra VS <<< "$V"; names=()
    for v in "${VS[@]}"; do
        name=${v%%:*}; opts=${v#*:}; names+=("$name")
        python3 benchmarks/bench_splatfacto.py --load-config $CFG --methods finetune --budgets "${BUDGETS[@]}" \
            --scenes 1 --images 1 --out /tmp/ftv_$name $opts > "$RES/variant_$name.log" 2>&1 &
        if [ -n "$SOLO" ]; then wait; echo "$name done after $(( $(date +%s) - start )) s"; else sleep 2; fi
    done
    wait
    echo "variants done after $(( $(date +%s) - start )) s"
    for name in "${names[@]}"; do
        python3 -c "import json; r=json.load(open('/tmp/ftv_$name/bench_splatfacto.json'))['scenes']
for s,row in r.items(): print('$name', s, [(round(p['seconds']), p['steps'], round(p['psnr'],2), round(p['ssim'],3)) for p in row['finetune_curve']])" \
            | tee -a "$RES/variants.txt"
    done ;;
esac
