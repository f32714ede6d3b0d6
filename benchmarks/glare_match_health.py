"""GLARE's regional match on a frozen base: entropy and top-1 weight with raw vs standardised tokens (issue 38).

Builds a GLARE config's data and frozen base (no training), takes ``--images`` items with the
objective's own two global views, samples the K attention-seeded regions exactly as the regional
term does, and prints, for each matching space, the match entropy over ln N and the mean largest
weight, in two cases: the regions matched in the *same* view (the easy case issue 38 measured) and in
the *other* view (what training uses). Also prints the mean pairwise cosine of raw patch tokens.

    python benchmarks/glare_match_health.py -c configs/medical/pneumoniamnist_glare.yaml --images 16
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from insitu.config import load_config
from insitu.objectives.glare import match_regions, match_space, pool_regions, sample_regions
from insitu.objectives.health import match_health
from insitu.pipelines.data import ScannedData, collate
from insitu.pipelines.holdout import pretraining_items
from insitu.pipelines.preprocess import resolve_preprocessing
from insitu.pipelines.pretrain import PretrainModule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", required=True)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], help="config overrides, key=value")
    args = ap.parse_args()
    cfg = load_config(args.config, args.set)
    torch.manual_seed(args.seed)
    data = ScannedData.scan(cfg.data)
    items = pretraining_items(cfg, data)
    prep = resolve_preprocessing(None, data, items, cfg.data.image_size, cfg.backbone)
    module = PretrainModule(cfg).eval()
    obj = module.objective
    ro = obj.opts.regional
    pick = torch.randperm(len(items), generator=torch.Generator().manual_seed(args.seed))[: args.images].tolist()
    dataset = prep.dataset(data, [items[i] for i in pick], obj.view_transform())
    batch = collate([dataset[i] for i in range(len(dataset))])
    teacher = module.teacher_model()
    with torch.no_grad():
        out = [teacher.forward_with_attention(v) for v in batch["views"][:2]]
    patches = out[0][1]
    z = F.normalize(patches, dim=-1)
    cos = z @ z.transpose(1, 2)
    n = patches.shape[1]
    print(
        f"{len(dataset)} images, N = {n} patches per view, K = {ro.regions} regions of {ro.window}x{ro.window}, match_temp {ro.match_temp}"
    )
    print(f"mean pairwise cosine of raw patch tokens within an image: {float(cos[:, ~torch.eye(n, dtype=torch.bool)].mean()):.3f}")
    print(f"uniform: entropy 1.000 x ln N, top-1 {1 / n:.4f}")
    for kind in ("raw", "centred", "standardised"):
        spaces = [match_space(o[1], kind) for o in out]
        for case, other in (("same view", 0), ("other view", 1)):
            masks = sample_regions(out[0][3].mean(1), out[0][2], ro.regions, ro.window)[1]
            weights = match_regions(pool_regions(spaces[0], masks), spaces[other], ro.match_temp)
            h = match_health(weights)
            print(f"{kind:>12} {case:>10}: entropy {float(h['match_entropy']):.3f} x ln N, top-1 {float(h['match_top1']):.4f}")


if __name__ == "__main__":
    main()
