"""The figures of issue 18 (visual circuits), measured end to end: trains the CNN and the ViT
on digits with an overlay class and a mark, then for each k runs every class's circuit with
its prune/keep tests, the composition test and the typographic attack (plain selection and
``contrast=True`` and ``baseline="mean"``). Prints one JSON object (also written to ``--out``) with the wall times.

    python bench/vision_figures.py [--ks 3,5] [--threads 1] [--out /tmp/vision-figures.json]
        [--archs cnn,vit] [--cnn-width 32] [--variants plain,contrast,baseline=mean]

Not a speed benchmark: the times say how long the experiments take on the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch

from mechscope.vision import (
    CircuitConfig,
    DataConfig,
    TrainConfig,
    run_attack,
    run_circuit,
    run_composition,
    train_model,
)


def classes_summary(vm, cfg: CircuitConfig) -> dict:
    rows = {}
    for c in range(len(vm.classes)):
        t = run_circuit(vm, str(c), cfg).tests
        rows[vm.classes[c]] = {"acc_drop_circuit": t["accuracy_drop"]["circuit"], "acc_drop_random": t["accuracy_drop"]["random"],
                               "logit_drop_circuit": t["logit_drop"]["circuit"], "logit_drop_random": t["logit_drop"]["random"],
                               "logit_share": t["logit_share"]["circuit"], "logit_share_random": t["logit_share"]["random"],
                               "logit_share_per_layer": t["logit_share_per_layer"]}
        if "edges" in t:
            rows[vm.classes[c]]["edge_acc_drop"] = t["edges"]["accuracy_drop"]
            rows[vm.classes[c]]["edge_logit_drop"] = t["edges"]["logit_drop"]
    mean = lambda key: statistics.fmean(r[key] for r in rows.values())  # noqa: E731
    sites = list(next(iter(rows.values()))["logit_share_per_layer"])
    edges = {}
    if all("edge_acc_drop" in r for r in rows.values()):
        edges = {f"edge_{m}_drop_{w}": statistics.fmean(r[f"edge_{m}_drop"][w] for r in rows.values())
                 for m in ("acc", "logit") for w in ("circuit", "random")}
    return {"per_class": rows, **edges,
            "acc_drop_ratio_of_means": mean("acc_drop_circuit") / mean("acc_drop_random") if mean("acc_drop_random") > 0 else None,
            "logit_drop_ratio_of_means": mean("logit_drop_circuit") / mean("logit_drop_random"),
            "classes_with_acc_ratio_ge_3": sum(r["acc_drop_random"] > 0 and r["acc_drop_circuit"] >= 3 * r["acc_drop_random"] for r in rows.values()),
            "mean_logit_share": mean("logit_share"), "mean_logit_share_random": mean("logit_share_random"),
            "mean_logit_share_per_layer": {s: statistics.fmean(r["logit_share_per_layer"][s] for r in rows.values()) for s in sites}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", default="3,5")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="/tmp/vision-figures.json")
    ap.add_argument("--archs", default="cnn,vit", help="which models to train and measure")
    ap.add_argument("--cnn-width", type=int, default=TrainConfig.width, help="the CNN's --width (channels of its last two conv layers)")
    ap.add_argument("--variants", default="plain,contrast,baseline=mean", help="selections to measure at each k")
    args = ap.parse_args()
    bad = [a for a in args.archs.split(",") if a not in ("cnn", "vit")] + \
        [v for v in args.variants.split(",") if v not in ("plain", "contrast", "baseline=mean")]
    if bad:
        ap.error(f"unknown --archs or --variants value {bad[0]!r}; archs: cnn, vit; variants: plain, contrast, baseline=mean")
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    res: dict = {"machine": {"cpus": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
                             "torch": torch.__version__, "load_avg_start": os.getloadavg()}, "models": {}}
    data = DataConfig(overlay=(3, 7), mark_class=0)
    with tempfile.TemporaryDirectory() as tmp:
        for arch, cfg in (("cnn", TrainConfig(arch="cnn", epochs=20, width=args.cnn_width, data=data)),
                          ("vit", TrainConfig(arch="vit", epochs=30, heads=8, data=data))):
            if arch not in args.archs.split(","):
                continue
            t0 = time.perf_counter()
            vm = train_model(cfg, out=f"{tmp}/{arch}")
            m = {"train": vm.metrics, "train_wall_s": time.perf_counter() - t0, "sites": {n: s.n_units for n, s in vm.sites.items()}, "k": {}}
            for k in ks:
                for variant in args.variants.split(","):
                    key = f"k={k} {variant}"
                    ccfg = CircuitConfig(k=k, contrast=variant == "contrast", baseline="mean" if variant == "baseline=mean" else "zero")
                    t0 = time.perf_counter()
                    circ = classes_summary(vm, ccfg)
                    t1 = time.perf_counter()
                    comp = run_composition(vm, ccfg)
                    comp.pop("units")
                    t2 = time.perf_counter()
                    _, att = run_attack(vm, ccfg)
                    t3 = time.perf_counter()
                    m["k"][key] = {"circuits": circ, "composition": comp, "attack": att,
                                   "wall_s": {"circuits_all_classes": t1 - t0, "composition": t2 - t1, "attack": t3 - t2}}
                    print(json.dumps({"model": arch, "setting": key, "acc_ratio": circ["acc_drop_ratio_of_means"],
                                      "logit_share": circ["mean_logit_share"], "edge": {k2: v for k2, v in circ.items() if k2.startswith("edge_")}, "jaccard_union": comp["jaccard_union_of_parts"],
                                      "jaccard_other_max": max(comp["jaccard_other_classes"].values()),
                                      "attack": [att["before"], att["after"]], "wall_s": m["k"][key]["wall_s"]}), flush=True)
            res["models"][arch] = m
    res["machine"]["load_avg_end"] = os.getloadavg()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
