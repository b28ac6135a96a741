"""Training-FLOPs ratios of every method for ResNet-32 on CIFAR-10, next to the paper's.

The paper's recipe (section 4.1): 300 epochs of 196 steps (50,000 images, batch 256),
ΔT = 100, t_i = T // 3, t_f = 2T // 3; ASP trains 300 dense epochs, then fine-tunes 300.
Prints markdown (the table of ``docs/flops.md``)::

    .venv/bin/python -m benchmarks.flops_table
    .venv/bin/python -m benchmarks.flops_table --maxq-resnet50   # MaxQ's ramp on ResNet-50

``--maxq-resnet50`` prints the ratios of MaxQ's ramps on ResNet-50 (ImageNet, 120 epochs of
5005 steps) next to SR-STE's, for the paper's Table 2 MaxQ (0.91 at 2:4).
"""

from __future__ import annotations

import argparse

from bame_apps.integrations.models import resnet32, resnet50
from bame_optim.flops import flops_breakdown, layer_flops
from bame_optim.peers.maxq import SCHEDULES

EPOCHS = 300
STEPS_PER_EPOCH = 196  # ceil(50_000 / 256)
DELTA_T = 100
INPUT_SHAPE = (3, 32, 32)

# (method, n, m, the paper's Table 1 ratio or "-"; "(T2)" marks a Table 2 number); lbc_lower
# is LBC's forward at its least dense (docs/flops.md), the same as lbc when N = 1
ROWS: list[tuple[str, int, int, str]] = [
    ("asp", 2, 4, "1.5"),
    ("srste", 2, 4, "0.83"),
    ("lbc", 2, 4, "0.72"),
    ("lbc_lower", 2, 4, "-"),
    ("maxq", 2, 4, "0.91 (T2)"),
    ("bimask", 2, 4, "0.66 (T2)"),
    ("static", 2, 4, "-"),
    ("bame", 2, 4, "0.63"),
    ("bame_bidir", 2, 4, "0.59 (T2)"),
    ("srste", 1, 4, "0.74"),
    ("lbc", 1, 4, "-"),
    ("maxq", 1, 4, "-"),
    ("bimask", 1, 4, "0.49"),
    ("static", 1, 4, "-"),
    ("bame", 1, 4, "0.39"),
    ("bame_bidir", 1, 4, "-"),
    ("srste", 1, 16, "0.67"),
    ("lbc", 1, 16, "-"),
    ("maxq", 1, 16, "-"),
    ("bimask", 1, 16, "0.37"),
    ("static", 1, 16, "-"),
    ("bame", 1, 16, "0.29"),
    ("bame_bidir", 1, 16, "-"),
]

# The paper's Table 3 (BAME, 1:16): (t_i, t_f) in epochs, paper's ratio
ABLATION: list[tuple[int, int, str]] = [
    (0, 100, "0.07"),
    (0, 200, "0.07"),
    (0, 300, "0.07"),
    (100, 300, "0.29"),
    (200, 300, "0.41"),
    (100, 200, "0.29"),
]


def main() -> None:
    model = resnet32()
    total = EPOCHS * STEPS_PER_EPOCH
    layers = {}
    for _, n, m, _ in ROWS:
        layers.setdefault((n, m), layer_flops(model, INPUT_SHAPE, n=n, m=m))
    dense_layers = layer_flops(model, INPUT_SHAPE)
    dense_flops = sum(layer.forward for layer in dense_layers)
    some = layers[(2, 4)]
    share = sum(3 * x.forward for x in some if x.sparse) / (3 * dense_flops)

    print(
        f"ResNet-32, input 3x32x32: {len(dense_layers)} Linear/Conv layers, forward "
        f"{dense_flops / 1e6:.1f} MFLOPs per sample (2 x MACs); sparse layers hold "
        f"{100 * share:.2f}% of the FLOPs (stem and classifier dense). T = {total} steps, "
        f"ΔT = {DELTA_T}, t_i = {total // 3}, t_f = {2 * total // 3}.\n"
    )
    print("| method | N:M | ours | paper | forward | input-grad | weight-grad |")
    print("|---|---|---|---|---|---|---|")
    dense = flops_breakdown(some, "dense", n=2, m=4, total_steps=total, delta_t=DELTA_T)
    print(
        f"| dense | - | {dense['ratio']:.3f} | 1 | {dense['forward_ratio']:.3f} "
        f"| {dense['input_grad_ratio']:.3f} | {dense['weight_grad_ratio']:.3f} |"
    )
    for method, n, m, paper in ROWS:
        b = flops_breakdown(layers[(n, m)], method, n=n, m=m, total_steps=total, delta_t=DELTA_T)
        print(
            f"| {method} | {n}:{m} | {b['ratio']:.3f} | {paper} | {b['forward_ratio']:.3f} "
            f"| {b['input_grad_ratio']:.3f} | {b['weight_grad_ratio']:.3f} |"
        )
    print("\nBAME 1:16, the paper's Table 3 schedules (t_i, t_f in epochs):\n")
    print("| t_i | t_f | ours | paper |")
    print("|---|---|---|---|")
    for t_i, t_f, paper in ABLATION:
        b = flops_breakdown(
            layers[(1, 16)],
            "bame",
            n=1,
            m=16,
            total_steps=total,
            t_i=t_i * STEPS_PER_EPOCH,
            t_f=t_f * STEPS_PER_EPOCH,
            delta_t=DELTA_T,
        )
        print(f"| {t_i} | {t_f} | {b['ratio']:.3f} | {paper} |")


IMAGENET_EPOCHS, IMAGENET_STEPS = 120, 5005  # ceil(1,281,167 / 256)
MAXQ_RAMPS = (0, 30, 60, 90, 120)  # t_i in epochs; the public code's ImageNet scripts use 30


def maxq_resnet50() -> None:
    """MaxQ's training-FLOPs ratio on ResNet-50 for every ramp and ramp length."""
    model = resnet50()
    total = IMAGENET_EPOCHS * IMAGENET_STEPS
    print(f"ResNet-50, input 3x224x224, T = {IMAGENET_EPOCHS} x {IMAGENET_STEPS} steps; MaxQ "
          "with the ramp ending at t_i (epochs); t_i = 0 is SR-STE plus one dense forward.\n")
    print("| N:M | SR-STE | ramp | " + " | ".join(f"t_i = {e}" for e in MAXQ_RAMPS) + " |")
    print("|---|---|---|" + "---|" * len(MAXQ_RAMPS))
    for n, m in ((2, 4), (1, 4), (1, 16)):
        layers = layer_flops(model, (3, 224, 224), n=n, m=m)
        srste = flops_breakdown(layers, "srste", n=n, m=m, total_steps=total)["ratio"]
        for schedule in SCHEDULES:
            ratios = [
                flops_breakdown(layers, "maxq", n=n, m=m, total_steps=total,
                                t_i=epochs * IMAGENET_STEPS, sparsity_schedule=schedule)["ratio"]
                for epochs in MAXQ_RAMPS
            ]
            print(f"| {n}:{m} | {srste:.3f} | {schedule} | "
                  + " | ".join(f"{r:.3f}" for r in ratios) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--maxq-resnet50", action="store_true",
                        help="MaxQ's ramps on ResNet-50 instead of the ResNet-32 table")
    if parser.parse_args().maxq_resnet50:
        maxq_resnet50()
    else:
        main()
