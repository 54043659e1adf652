"""Generate a held-out retrieval set of edited copies, in the Holidays layout.

The third set of the leave-one-set-out choice of re-ranking defaults
(benchmarks/results/reranking.md): neither UKBench nor paris6k-mini, and not tuned on.
Each of `--groups` photos (sorted by name, every n-th of the source folders) is a group:
its query is the photo itself (`<out>/jpg/GGG00.jpg`), its members 1 to 4 edited copies
(`GGG01.jpg`...): crops of 55-90 % of the area, a few turned by 90 or 270 degrees,
downscaled and re-compressed, brightness and contrast changed. `retrieval_map.py
--dataset holidays --root OUT` scores it (mAP, the query left out of its own ranking);
the ground truth is the numbering. The same arguments give the same files.

    python benchmarks/make_copies_set.py ../shared/data/hymenoptera/val /tmp/copies --groups 100
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageEnhance

SUFFIXES = {".jpg", ".jpeg", ".png"}


def edited(photo: Image.Image, rng: random.Random) -> Image.Image:
    """One edited copy: crop, maybe a quarter turn, rescale, tone change."""
    w, h = photo.size
    area = rng.uniform(0.55, 0.9)
    aspect = rng.uniform(0.8, 1.25)
    cw = min(w, int(round(w * (area * aspect) ** 0.5)))
    ch = min(h, int(round(h * (area / aspect) ** 0.5)))
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    out = photo.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.25:
        out = out.transpose(rng.choice([Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270]))
    scale = rng.uniform(0.5, 1.0)
    out = out.resize((max(32, int(out.width * scale)), max(32, int(out.height * scale))), Image.BILINEAR)
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.75, 1.25))
    return ImageEnhance.Contrast(out).enhance(rng.uniform(0.8, 1.2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="folder of photos (searched recursively)")
    p.add_argument("out", help="output root; the images go to OUT/jpg")
    p.add_argument("--groups", type=int, default=100, help="photos, each a group (default 100)")
    p.add_argument("--seed", type=int, default=21)
    args = p.parse_args()
    photos = sorted(q for q in Path(args.source).rglob("*") if q.suffix.lower() in SUFFIXES)
    if len(photos) < args.groups:
        raise SystemExit(f"{args.source}: {len(photos)} photos, fewer than --groups {args.groups}")
    chosen = photos[:: len(photos) // args.groups][: args.groups]
    rng = random.Random(args.seed)
    folder = Path(args.out) / "jpg"
    folder.mkdir(parents=True, exist_ok=True)
    images = 0
    for g, path in enumerate(chosen, start=1):
        photo = Image.open(path).convert("RGB")
        photo.save(folder / f"{g:04d}00.jpg", quality=90)
        for m in range(1, rng.randint(1, 4) + 1):
            edited(photo, rng).save(folder / f"{g:04d}{m:02d}.jpg", quality=rng.choice([50, 70, 90]))
        images += 1 + m
    print(f"{args.out}: {len(chosen)} groups, {images} images")


if __name__ == "__main__":
    main()
