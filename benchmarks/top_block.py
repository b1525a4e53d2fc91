#!/usr/bin/env python
"""Fine-tuning the top of the backbone from cached activations (issue 36), measured before building it.

The cpu recipe trains an MLP head on frozen features: every block's spatial mean and std of
EfficientNet-Lite0 for each photo and its blurred pseudo-reference (the feature cache). Issue 36 asks
whether adapting the top of the backbone beats that at close to a head's cost. Lite0's last block
(``blocks.6``: 192 -> 1152 -> 320 channels at stride 32) sees a 16x16x192 map of a 500x500 photo:
this benchmark caches that map (for the photo and its pseudo-reference, 393 KB per photo in
float32) beside the pooled features of the 15 blocks before it, and compares, on the same folds:

* ``frozen``: the recipe's head (:func:`frozen_features.head_predict`'s loop: 20 epochs x 10 draws
  of every training photo, AdamW 3e-4, cosine, L1 + 0.1 x margin ranking) on the frozen features;
* ``+ head``: that head trained ``--passes`` more passes over the training photos with everything
  else frozen (a control: is any gain only more training?);
* ``+ top block xM``: the same extra passes with the last block trained too (its learning rate M
  times the head's, ``--block-lr-mults``, default 1 and 3), its mean and
  std recomputed from the cached maps at every step.

The extra passes use a constant learning rate of ``--lr`` (the head's starting rate x 0.1 by default).
Protocol as for the recipe's other levers: the seed-0 split's train+val photos of LIVE Challenge cut
into 5 folds (fold seed 0; ``--seeds`` for more), each variant trained on four and scored on the fifth
(SRCC); paired differences from ``frozen`` with their standard error and folds won. Test photos are
not used. Written to ``benchmarks/results/top_block.json``.

    python benchmarks/top_block.py [--seeds 0 1] [--passes 4]
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from frozen_features import CV_FOLDS, cv_folds, fold_summary, recipe_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def cache_with_top_maps(images: list[np.ndarray], config: Any) -> tuple[np.ndarray, list[Any], Any, int]:
    """The recipe's pooled features of ``images`` (as the feature cache holds them), the maps entering
    the last block for each photo and its pseudo-reference (one (2, C, H, W) float32 tensor per photo: photos differ in size), that block (a
    copy, the BatchNorms folded as the feature pass runs it) and its output channels."""
    import torch

    from iqa_ray.training.build import build
    from iqa_ray.training.inference import ready_for_inference

    model = build(config, torch.device("cpu"))
    _, verify = ready_for_inference(model, config)
    group = model.backbone.body.blocks[-1]
    if len(group) != 1:
        raise SystemExit(f"this benchmark trains the last block group when it is one block; it has {len(group)}")
    last = group[0]  # the backbone's every-block taps call the blocks themselves, not their group
    seen: list[torch.Tensor] = []
    hook = last.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].float().contiguous()))
    pooled, maps = [], []
    with torch.inference_mode():
        for i, image in enumerate(images):
            batch = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float().div_(255.0)
            verify(batch)
            seen.clear()
            pooled.append(model.pool_images(batch.contiguous(memory_format=torch.channels_last)).numpy())
            blurred, photo = seen  # the pseudo-reference goes through the backbone first
            maps.append(torch.cat([photo, blurred]).clone())
            if (i + 1) % 100 == 0:
                print(f"[features] {i + 1}/{len(images)}", flush=True)
    hook.remove()
    block = copy.deepcopy(last)
    out_channels = int(model.backbone.tap_channels[-1])
    return np.concatenate(pooled), maps, block, out_channels


def split_columns(x: np.ndarray, c_last: int) -> np.ndarray:
    """The pooled features without the last block's mean and std (of the photo, and of its change
    under the blur): the columns the trained block recomputes."""
    half = x.shape[1] // 2
    return np.concatenate([x[:, :half - 2 * c_last], x[:, half:2 * half - 2 * c_last]], axis=1)


def top_features(block: Any, maps: Any) -> Any:
    """(B, 4 * C) the last block's mean and std of each photo, then their change under the blur."""
    import torch

    out = block(maps.flatten(0, 1)).float().flatten(2)  # (2B, C, HW): photos, then pseudo-references
    stats = torch.cat([out.mean(2), out.std(2, correction=0)], 1).unflatten(0, (maps.shape[0], 2))
    return torch.cat([stats[:, 0], stats[:, 0] - stats[:, 1]], 1)


def top_rows(block: Any, maps: list[Any], idx: Any) -> Any:
    """:func:`top_features` of rows ``idx`` of ``maps``, the rows of each map size in one batch."""
    import torch

    idx = [int(i) for i in idx]
    groups: dict[tuple[int, ...], list[int]] = {}
    for pos, i in enumerate(idx):
        groups.setdefault(tuple(maps[i].shape), []).append(pos)
    out: list[Any] = [None] * len(idx)
    for positions in groups.values():
        feats = top_features(block, torch.stack([maps[idx[p]] for p in positions]))
        for j, p in enumerate(positions):
            out[p] = feats[j]
    return torch.stack(out)


def run_fold(frozen: np.ndarray, maps: list[Any], block0: Any, mos: np.ndarray, train: np.ndarray,
             test: np.ndarray, seed: int, *, passes: int, lr: float, block_lr_mults: list[float]) -> dict[str, float]:
    """Held-out SRCC of the three variants on one fold (see the module docstring)."""
    import torch
    from torch import nn

    from iqa_ray.core.metrics import srcc

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    f0 = torch.from_numpy(frozen.astype(np.float32))
    m = maps
    target = torch.from_numpy(mos.astype(np.float32))
    block = copy.deepcopy(block0).eval()
    with torch.no_grad():
        top0 = torch.cat([top_rows(block, m, range(i, min(i + 32, len(m)))) for i in range(0, len(m), 32)])
    feats = torch.cat([f0, top0], 1)
    tr = torch.from_numpy(train)
    mean, std = feats[tr].mean(0), feats[tr].std(0, correction=0).clamp_min(1e-6)
    t_mean, t_std = target[tr].mean(), target[tr].std()
    n_frozen = f0.shape[1]
    head = nn.Sequential(nn.Linear(feats.shape[1], 256), nn.GELU(), nn.Dropout(0.5), nn.Linear(256, 1))
    nn.init.normal_(head[-1].weight, std=1e-3)
    nn.init.zeros_(head[-1].bias)
    alpha, margin, batch = 0.1, 0.5, 32

    def loss_of(pred: Any, idx: Any) -> Any:
        y = (target[idx] - t_mean) / t_std
        ordered = y[:, None] > y[None, :]
        hinge = (margin / t_std - (pred[:, None] - pred[None, :])).clamp_min(0)[ordered]
        return (1 - alpha) * (pred - y).abs().mean() + alpha * hinge.mean()

    def scores(of_block: bool) -> np.ndarray:
        head.eval()
        with torch.no_grad():
            x = feats[torch.from_numpy(test)]
            if of_block:
                block.eval()
                x = torch.cat([x[:, :n_frozen], torch.cat([top_rows(block, m, test[i:i + 32])
                                                           for i in range(0, len(test), 32)])], 1)
            out = head((x - mean) / std).squeeze(1).numpy().astype(np.float64)
        head.train()
        return out

    # 1. the recipe's head on the frozen features
    epochs, draws, head_lr = 20, 10, 3e-4
    steps = len(train) * draws // batch
    opt = torch.optim.AdamW(head.parameters(), lr=head_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps, eta_min=head_lr * 0.01)
    rows = tr.repeat(draws)
    for _ in range(epochs):
        order = rows[torch.randperm(len(rows), generator=gen)]
        for step in range(steps):
            idx = order[step * batch:(step + 1) * batch]
            loss = loss_of(head((feats[idx] - mean) / std).squeeze(1), idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    out = {"frozen": float(srcc(scores(False), mos[test]))}
    trained_head = copy.deepcopy(head.state_dict())

    # 2. more passes: the head alone, then the head and the last block, from the same head and order
    extra = [tr[torch.randperm(len(tr), generator=gen)] for _ in range(passes)]
    for name, mult in (("+ head", 0.0), *((f"+ top block x{m:g}", m) for m in block_lr_mults)):
        with_block = mult > 0
        head.load_state_dict(trained_head)
        block = copy.deepcopy(block0)
        groups = [{"params": head.parameters(), "lr": lr}]
        if with_block:
            block.train().requires_grad_(True)  # the backbone it comes from is frozen
            groups.append({"params": block.parameters(), "lr": lr * mult})
        opt = torch.optim.AdamW(groups, weight_decay=1e-2)
        for order in extra:
            for step in range(max(1, len(order) // batch)):
                idx = order[step * batch:(step + 1) * batch]
                x = feats[idx]
                if with_block:
                    x = torch.cat([x[:, :n_frozen], top_rows(block, m, idx)], 1)
                loss = loss_of(head((x - mean) / std).squeeze(1), idx)
                opt.zero_grad()
                loss.backward()
                opt.step()
        out[name] = float(srcc(scores(with_block), mos[test]))
        if with_block:  # how far the block moved: its weights' largest relative change
            moved = max(float((a.detach() - b).abs().max() / b.abs().max().clamp_min(1e-12))
                        for a, b in zip(block.parameters(), block0.parameters()))
            out[f"{name} moved"] = moved
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="fold seeds (default 0: 5 folds)")
    p.add_argument("--passes", type=int, default=4, help="extra passes over the training photos (default 4)")
    p.add_argument("--lr", type=float, default=3e-5, help="learning rate of the extra passes (default 3e-5)")
    p.add_argument("--block-lr-mults", type=float, nargs="+", default=[1.0, 3.0],
                   help="the block's rate over the head's, one variant each (default 1 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--limit", type=int, default=0, help="only the first N train+val photos (a quick check of the script)")
    p.add_argument("--json", type=Path, default=RESULTS / "top_block.json")
    args = p.parse_args()
    if args.passes < 1 or args.lr <= 0 or any(m <= 0 for m in args.block_lr_mults):
        p.error(f"--passes must be >= 1 and --lr, --block-lr-mults > 0, got {args.passes}, {args.lr}, {args.block_lr_mults}")

    import torch

    from iqa_ray.core.io import atomic_write_json
    from iqa_ray.training.loaders import load_decoded

    torch.set_num_threads(args.threads)
    config = recipe_config()
    decoded = load_decoded(config)
    table = decoded.table
    rows = np.flatnonzero(np.isin(table["split"].to_numpy(), ("train", "val")))
    if args.limit:
        rows = rows[:args.limit]
    mos = table["mos"].to_numpy(np.float64)[rows]  # positions in ``rows`` from here on: test photos are never read
    t0 = time.perf_counter()
    pooled, maps, block, c_last = cache_with_top_maps([decoded.images[i] for i in rows], config)
    feature_s = time.perf_counter() - t0
    frozen = split_columns(pooled, c_last)
    maps_mb = sum(x.numel() * x.element_size() for x in maps) / 1e6
    # the block on the cached maps gives back the cache's own columns: the maps are the right ones
    with torch.no_grad():
        again = top_rows(copy.deepcopy(block).eval(), maps, range(8)).numpy()
    half = pooled.shape[1] // 2
    expected = np.concatenate([pooled[:8, half - 2 * c_last:half], pooled[:8, 2 * half - 2 * c_last:]], axis=1)
    gap = float(np.max(np.abs(again - expected)) / max(1e-12, float(np.max(np.abs(expected)))))
    print(f"[features] {len(pooled)} photos in {feature_s:.0f} s; maps {maps_mb:.0f} MB ({len({tuple(x.shape) for x in maps})} sizes); "
          f"last block recomputed from them: largest difference {gap:.1e} of the largest value", flush=True)
    if gap > 1e-3:
        raise SystemExit(f"the last block on the cached maps does not give the cache's features (difference {gap:.1e})")

    scores: dict[str, list[float]] = {}
    moved: dict[str, list[float]] = {}
    seconds: list[float] = []
    for seed in args.seeds:
        # the folds of the other levers' benchmarks: cv_folds permutes positions the same way whatever the values
        for k, rest, held in cv_folds(np.arange(len(rows)), seed):
            t = time.perf_counter()
            fold = run_fold(frozen, maps, block, mos, rest, held, 100 * seed + k, passes=args.passes, lr=args.lr,
                            block_lr_mults=args.block_lr_mults)
            seconds.append(time.perf_counter() - t)
            for name, v in fold.items():
                (moved if name.endswith(" moved") else scores).setdefault(name, []).append(v)
            print(f"[cv] fold seed {seed} fold {k}: " + "  ".join(f"{n} {v:.4g}" for n, v in fold.items())
                  + f"  ({seconds[-1]:.0f} s)", flush=True)
    result = fold_summary(scores, "frozen")
    print(f"\n{CV_FOLDS}-fold cross-validation over the seed-0 split's {len(rows)} train+val photos, fold seeds "
          f"{args.seeds}; {args.passes} extra passes at lr {args.lr:g}:\n")
    print("| variant | mean SRCC | vs frozen, per fold | wins |")
    print("|---|---|---|---|")
    for name, r in result.items():
        d = r.get("vs_frozen")
        diff = f"{d['diff_mean']:+.4f} +- {d['diff_se']:.4f}" if d else ""
        print(f"| {name} | {r['mean']:.4f} | {diff} | {d['wins'] if d else ''}{'/' + str(d['folds']) if d else ''} |")
    atomic_write_json(args.json, {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                  "machine": platform.processor() or platform.machine(), "feature_s": feature_s,
                                  "maps_mb": maps_mb, "fold_seconds": seconds, "per_fold": scores,
                                  "block_moved": moved,
                                  "result": result})
    print(f"\nwritten {args.json}")


if __name__ == "__main__":
    main()
