"""The main job, offline: index a small image set and query it with a transformed crop.

Images: 24 procedurally generated scenes (shapes, textures and gradients), so the demo
needs no download. The query is a crop of one indexed image, rotated, re-coloured and
rescaled; the ranked hits should put that image first.

Weights: the pretrained MobileNetV2 ONNX model in ../shared/weights when it is there,
else torchvision's pretrained ResNet-50 if it can be fetched, else a random-init
ResNet-18 — and the demo says which one it used.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from retrieval import ExtractorConfig, Index, RuntimeConfig, SearchConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED_ONNX = ROOT.parent / "shared" / "weights" / "mobilenetv2-12-int8.onnx"
OUT = ROOT / "demo-out"


def scene(seed: int, size=(320, 240)) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-0.6, 0.6, (2, 3))
    bg = np.clip(base + x[..., None] * slope[0] + y[..., None] * slope[1], 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(8, 16))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        x1, y1 = x0 + int(rng.integers(15, 120)), y0 + int(rng.integers(15, 100))
        kind = rng.integers(0, 4)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif kind == 2:
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(2, 9)))
        else:
            pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(3)]
            draw.polygon(pts, fill=colour)
    return img


def transformed_crop(img: Image.Image) -> Image.Image:
    w, h = img.size
    crop = img.crop((int(w * 0.2), int(h * 0.15), int(w * 0.85), int(h * 0.9)))
    crop = crop.rotate(6, resample=Image.BICUBIC, expand=False)
    crop = ImageEnhance.Brightness(crop).enhance(1.15)
    crop = ImageEnhance.Color(crop).enhance(0.8)
    crop = crop.filter(ImageFilter.GaussianBlur(0.6))
    return crop.resize((int(crop.width * 0.8), int(crop.height * 0.8)), Image.BICUBIC)


def choose_extractor() -> tuple[ExtractorConfig, str]:
    if SHARED_ONNX.is_file():
        return (
            ExtractorConfig(onnx=str(SHARED_ONNX), onnx_output="627"),
            f"pretrained MobileNetV2 (ImageNet, int8 ONNX) from {SHARED_ONNX}",
        )
    try:
        import torchvision

        torchvision.models.ResNet50_Weights.DEFAULT.get_state_dict(progress=False)
        return ExtractorConfig(backbone="resnet50", weights="DEFAULT"), "pretrained ResNet-50 (torchvision DEFAULT weights)"
    except Exception as err:  # offline: no weights to be had
        return (
            ExtractorConfig(backbone="resnet18", weights="none"),
            f"RANDOM-INIT ResNet-18: no pretrained weights could be had ({type(err).__name__}); "
            "hits show the pipeline working, not pretrained accuracy",
        )


def main() -> int:
    if OUT.exists():
        shutil.rmtree(OUT)
    images = OUT / "images"
    images.mkdir(parents=True)
    for i in range(24):
        scene(i).save(images / f"scene{i:02d}.jpg", quality=92)
    target = 7
    query = OUT / "query.jpg"
    transformed_crop(Image.open(images / f"scene{target:02d}.jpg")).save(query, quality=90)

    config, weights_note = choose_extractor()
    print(f"weights: {weights_note}")
    store = Path(tempfile.mkdtemp(prefix="retrieval-demo-")) / "features.sqlite"
    idx = Index.create(
        OUT / "index", config, SearchConfig(levels=(1, 2, 3), pca_dim=64),
        store=store, runtime=RuntimeConfig(batch_size=16),
    )
    report = idx.add([str(p) for p in sorted(images.iterdir())])
    print(f"indexed {report.images} images in {report.seconds:.1f} s ({idx.info()['native_kernel']})")
    result = idx.search([str(query)], k=5)[0]
    print(f"query: {query} (a rotated, re-coloured crop of scene{target:02d}.jpg)")
    for hit in result.hits:
        # Re-ranked by default at this size: the order follows rerank_distance, and
        # distance stays the one the two windows decide.
        order = "" if hit.rerank_distance is None else f"re-ranked {hit.rerank_distance:.4f}, "
        print(f"  {hit.rank}. {Path(hit.path).name}  {order}distance {hit.distance:.4f}  "
              f"query window {hit.query_box} ~ db window {hit.db_box}")
    top = Path(result.hits[0].path).name
    print("top hit is the source image" if top == f"scene{target:02d}.jpg" else f"top hit is {top}, not the source")
    shutil.rmtree(store.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
