"""Per-epoch training time with the frozen prefix cached vs the naive partial-freeze loop (the baseline).

Both loops train the same partially frozen DeiT3 (stem + first k blocks frozen, augmentation off) on
the same real dev images with AdamW and masked BCE. The naive loop runs the frozen prefix under
no_grad every step (as `medvit.model.Classifier` does); the cached loop computes the prefix once
(`FrozenFeatures.build`, counted in the amortised ratio) and then trains `TrainableSuffix` on the tokens.
Epochs of the two loops alternate, so both see the same load on a shared machine. Prints the per-epoch
ratio naive / cached (median epoch), and amortised over all epochs including the cache build.

    python benchmarks/frozen_cache.py [--images 64] [--epochs 3] [--img-size 224] [--depth 12] [--freeze 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/cxr14-dev"))
    parser.add_argument("--images", type=int, default=64, help="training images (from the dev train split)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default="deit3_small_patch16_384")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--freeze", type=int, default=6, help="frozen blocks (after the stem)")
    args = parser.parse_args(argv)

    import os

    import torch
    from torch.utils.data import DataLoader

    from medvit.config import LossConfig, ModelConfig
    from medvit.data.datasets import XrayDataset, load_labels
    from medvit.data.transforms import build_transforms, resolve_preprocessing
    from medvit.findings import DEFAULT_FINDINGS
    from medvit.model.classifier import build_model
    from medvit.model.losses import MaskedMultiLabelLoss
    from medvit.train.frozen import FrozenFeatures, TrainableSuffix

    data = Path(args.data)
    df = load_labels(data / "labels.csv", data / "images")
    df = df[df["split"] == "train"].head(args.images)
    cfg = ModelConfig(name=args.model, pretrained=False, freeze_blocks=args.freeze, drop_path_rate=0.0,
                      model_kwargs={"img_size": args.img_size, "depth": args.depth})

    def fresh():
        torch.manual_seed(0)
        return build_model(cfg, len(DEFAULT_FINDINGS))

    net = fresh()
    ds = XrayDataset(df, DEFAULT_FINDINGS, build_transforms(resolve_preprocessing(net.backbone), train=False),
                     cache=True)
    for i in range(len(ds)):  # decode once up front: both loops then measure model time only
        ds.pixels(i)
    loss_fn = MaskedMultiLabelLoss(LossConfig(pos_weight=False), None)

    def epoch(model, forward, loader, opt):
        t0 = time.perf_counter()
        model.train()
        for x, y in loader:
            loss = loss_fn(forward(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return time.perf_counter() - t0, loss.item()

    def adamw(model):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    naive_net, cached_net = net, fresh()
    t0 = time.perf_counter()
    cache = FrozenFeatures.build(cached_net, ds, batch_size=args.batch_size)
    build_s = time.perf_counter() - t0
    naive_loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False)
    cached_loader = DataLoader(cache, batch_size=args.batch_size, shuffle=False)
    suffix = TrainableSuffix(cached_net)
    naive_opt, cached_opt = adamw(naive_net), adamw(cached_net)
    naive_times, cached_times, naive_losses, cached_losses = [], [], [], []
    for _ in range(args.epochs):  # interleaved, so both loops see the same load on a shared machine
        t, loss = epoch(naive_net, naive_net, naive_loader, naive_opt)
        naive_times.append(t)
        naive_losses.append(loss)
        t, loss = epoch(cached_net, suffix, cached_loader, cached_opt)
        cached_times.append(t)
        cached_losses.append(loss)

    later = statistics.median(naive_times) / statistics.median(cached_times)
    amortised = sum(naive_times) / (build_s + sum(cached_times))
    report = {
        "baseline": "naive partial-freeze loop",
        "model": f"{args.model} depth {args.depth} @ {args.img_size}px, {args.freeze} of {args.depth} blocks frozen",
        "images": len(ds), "epochs": args.epochs, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0],
        "naive_epoch_s": naive_times, "cache_build_s": build_s, "cached_epoch_s": cached_times,
        "speedup_per_epoch": later, "speedup_amortised": amortised,
        "final_loss": {"naive": naive_losses[-1], "cached": cached_losses[-1]},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
