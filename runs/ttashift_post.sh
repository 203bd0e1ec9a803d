# usage: bash runs/ttashift_post.sh SEED   (after the --tta-shift 2 run of that seed)
set -e
N=$1
cd /work/main && . .venv/bin/activate && export MER_SHARED=/work/shared
R=runs/loso_ststnet_shift2_ttashift2_seed$N; T=docs/results/tta_shift; S=docs/results/seeds
python -m training calibrate --rule prior --run-dir $R --results $T/ststnet_shift2_ttashift2_loso_seed$N.json --out $T/ststnet_shift2_ttashift2_prior_calibrated_seed$N.json | tail -4
python -m training calibrate --rule bias --run-dir $R --results $T/ststnet_shift2_ttashift2_loso_seed$N.json --out $T/ststnet_shift2_ttashift2_bias_calibrated_seed$N.json | tail -4
for kind in "asis:loso_nested_cpu:loso" "prior:prior_calibrated:prior_calibrated" "bias:bias_calibrated:bias_calibrated"; do
  IFS=: read name ref new <<< "$kind"
  python -m training compare $S/ststnet_shift2_${ref}_seed$N.json:cv_ensemble $T/ststnet_shift2_ttashift2_${new}_seed$N.json:cv_ensemble --out $T/ttashift2_vs_mirror_${name}_seed${N}_compare.json | tail -3
  python -m training compare $S/ststnet_shift2_${ref}_seed$N.json $T/ststnet_shift2_ttashift2_${new}_seed$N.json --out $T/ttashift2_vs_mirror_${name}_single_seed${N}_compare.json | tail -3
done
python - $N <<'PY'
import json, sys
n=sys.argv[1]; S="docs/results/seeds/"; T="docs/results/tta_shift/"
db=lambda d:" / ".join(f"{d['per_database'][k]['uf1']:.3f}" for k in ("casme2","smic","samm"))
ref={"asis":S+f"ststnet_shift2_loso_nested_cpu_seed{n}.json","prior":S+f"ststnet_shift2_prior_calibrated_seed{n}.json","bias":S+f"ststnet_shift2_bias_calibrated_seed{n}.json"}
new={"asis":T+f"ststnet_shift2_ttashift2_loso_seed{n}.json","prior":T+f"ststnet_shift2_ttashift2_prior_calibrated_seed{n}.json","bias":T+f"ststnet_shift2_ttashift2_bias_calibrated_seed{n}.json"}
for k in ref:
    a,b=json.load(open(ref[k])),json.load(open(new[k]))
    for kind in ("single","cv"):
        ga,gb=(a,b) if kind=="single" else (a["nested_cv_ensemble"],b["nested_cv_ensemble"])
        pa=[p for p in (ga["predictions"] if "predictions" in ga else [])]
        print(f"{k:6s} {kind:6s} mirror {ga['uf1']:.4f}/{ga['uar']:.4f} [{db(ga)}]  tta-shift {gb['uf1']:.4f}/{gb['uar']:.4f} [{db(gb)}]  d {gb['uf1']-ga['uf1']:+.4f}")
a,b=json.load(open(ref["asis"])),json.load(open(new["asis"]))
print("chosen epochs equal:", a["nested_selection"]["chosen_epochs"]==b["nested_selection"]["chosen_epochs"])
for k in ("prior","bias"):
    ca,cb=json.load(open(ref[k]))["calibration"],json.load(open(new[k]))["calibration"]
    key="tau_per_subject" if k=="prior" else "bias_per_subject"
    print(k,"calibration equal:", ca.get(key)==cb.get(key), [x for x in ca if "per_subject" in x])
print("wall", b.get("total_wall_time_s"))
PY
