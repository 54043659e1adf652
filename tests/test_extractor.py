"""Extraction: crop and roi windows, pooling, mirrors, image decoding."""
import numpy as np
import pytest
from PIL import Image

from retrieval.config import ExtractorConfig, InputSpec, RuntimeConfig
from retrieval.extraction.extractor import Extracted, Extractor, Job, Skipped
from retrieval.extraction.pooling import pool_map
from retrieval.extraction.images import ImageError, load_rgb
from retrieval.extraction.patches import jitter_regions, level_regions

from conftest import make_scene

SPEC = InputSpec(size=(64, 64))


def _extract(path, mode, regions, pool="avg", roi_size=None):
    # On the CPU: these tests compare window geometry to 1e-5, and on a GPU cuDNN picks
    # other convolution algorithms (and TF32) for other batch shapes, which differ by about
    # 1e-3 (benchmarks/gpu_check.py measures CUDA against CPU; benchmarks/results/gpu.md).
    ex = Extractor(
        ExtractorConfig(backbone="resnet18", weights="none", input_spec=SPEC, pool=pool,
                        patch_mode=mode, roi_size=roi_size),
        RuntimeConfig(device="cpu", batch_size=7, workers=2),
    )
    (out,) = ex.extract([Job(str(path), tuple(regions))], progress=False)
    assert isinstance(out, Extracted)
    return ex, out


def test_crop_and_roi_agree_on_the_whole_image(tmp_path):
    path = tmp_path / "a.jpg"
    make_scene(1).save(path)
    _, crop = _extract(path, "crop", [level_regions(1), level_regions(2)])
    _, roi = _extract(path, "roi", [level_regions(1), level_regions(2)])
    assert crop.descriptors["level2"].shape == roi.descriptors["level2"].shape == (4, 512)
    np.testing.assert_allclose(crop.descriptors["level1"], roi.descriptors["level1"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(crop.descriptors["level2"], roi.descriptors["level2"])


def test_roi_windows_pool_the_feature_map(tmp_path):
    path = tmp_path / "a.jpg"
    make_scene(2).save(path)
    ex, out = _extract(path, "roi", [level_regions(2)], pool="max")
    whole = np.asarray(load_rgb(path).resize((64, 64), Image.BILINEAR))
    fmap = ex.backbone(whole[None])[0]  # [512, 2, 2] at 64 px
    h, w = fmap.shape[1:]
    # Level-2 windows cover 2/3 of each side: on a 2x2 map, every window takes all cells.
    for vec in out.descriptors["level2"]:
        np.testing.assert_allclose(vec, fmap.reshape(512, -1).max(axis=1), rtol=1e-5)
    assert (h, w) == (2, 2)


def test_roi_size_feeds_a_larger_image(tmp_path):
    path = tmp_path / "a.jpg"
    make_scene(3, size=(200, 100)).save(path)
    ex, big = _extract(path, "roi", [level_regions(3)], roi_size=256)
    _, small = _extract(path, "roi", [level_regions(3)])
    assert not np.allclose(big.descriptors["level3"], small.descriptors["level3"])
    assert ExtractorConfig(patch_mode="roi", roi_size=256).key() != ExtractorConfig(patch_mode="roi").key()
    # Images of other aspect ratios in one batch: one forward pass per input shape.
    tall = tmp_path / "tall.jpg"
    make_scene(5, size=(80, 160)).save(tall)
    ex = Extractor(
        ExtractorConfig(backbone="resnet18", weights="none", input_spec=SPEC, patch_mode="roi", roi_size=128),
        RuntimeConfig(batch_size=8),
    )
    outs = list(ex.extract([Job(str(p), (level_regions(2),)) for p in (path, tall, path)], progress=False))
    assert [o.descriptors["level2"].shape for o in outs] == [(4, 512)] * 3
    np.testing.assert_allclose(outs[0].descriptors["level2"], outs[2].descriptors["level2"], rtol=1e-5)


def test_mirrored_jitter_sample_is_the_mirrored_crop(tmp_path):
    path = tmp_path / "a.jpg"
    make_scene(4).save(path)
    ex, out = _extract(path, "crop", [jitter_regions()])
    desc = out.descriptors["jitter12"]
    assert desc.shape == (12, 512)
    mirrored = np.asarray(load_rgb(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((64, 64), Image.BILINEAR))
    np.testing.assert_allclose(desc[11], pool_map(ex.backbone(mirrored[None])[0], "avg"), rtol=1e-5, atol=1e-6)


def test_pooling_values():
    fmap = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
    np.testing.assert_allclose(pool_map(fmap, "avg"), [2.5, 8.5])
    np.testing.assert_allclose(pool_map(fmap, "max"), [5, 11])
    gem = (np.mean(np.clip(fmap.reshape(2, -1), 1e-6, None) ** 3, axis=1)) ** (1 / 3)
    np.testing.assert_allclose(pool_map(fmap, "gem"), gem, rtol=1e-6)


def test_skips_do_not_stop_the_batch(tmp_path):
    good = tmp_path / "good.jpg"
    make_scene(5).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ex = Extractor(ExtractorConfig(backbone="resnet18", weights="none", input_spec=SPEC), RuntimeConfig(batch_size=3))
    outs = list(ex.extract([Job(str(p), (level_regions(2),)) for p in (good, bad, good)], progress=False))
    assert [type(o) for o in outs] == [Extracted, Skipped, Extracted]
    np.testing.assert_array_equal(outs[0].descriptors["level2"], outs[2].descriptors["level2"])


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "I;16", "LA"])
def test_colour_modes_become_rgb(tmp_path, mode):
    rgb = make_scene(6, size=(40, 30))
    if mode == "I;16":
        img = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    else:
        img = rgb.convert(mode)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    img.save(path)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (40, 30)
    if mode == "I;16":  # 16-bit is rescaled to the full 8-bit range, not clipped
        assert np.asarray(out).max() == 255


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    out = load_rgb(path)
    assert out.size == (20, 40)
    top = np.asarray(out)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the blue strip is now on top


def test_unreadable_reasons(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        load_rgb(tmp_path / "missing.png")
    (tmp_path / "e.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        load_rgb(tmp_path / "e.jpg")


class _Recording:
    """A stand-in backbone: records the batches it is given and the thread it runs in."""

    input_size, dynamic_size, output_kind = (32, 32), False, "vector"

    def __init__(self, fail_at: int | None = None) -> None:
        import threading

        self.batches, self.threads, self.fail_at, self._threading = [], set(), fail_at, threading

    def __call__(self, x):
        self.threads.add(self._threading.get_ident())
        self.batches.append(len(x))
        if self.fail_at is not None and len(self.batches) > self.fail_at:
            raise RuntimeError("the network broke")
        return x.reshape(len(x), -1)[:, :8].astype(np.float32)  # 8 pixel values: a per-window fingerprint


def _pipeline(tmp_path, n, batch_size, backbone, workers=2):
    import threading

    paths = []
    for i in range(n):
        paths.append(tmp_path / f"s{i}.jpg")
        make_scene(i).save(paths[-1])
    paths.insert(3, tmp_path / "missing.jpg")
    ex = Extractor(ExtractorConfig(backbone="resnet18", weights="none", input_spec=SPEC),
                   RuntimeConfig(device="cpu", batch_size=batch_size, workers=workers))
    ex._backbone = backbone
    jobs = [Job(str(p), (level_regions(1), level_regions(2))) for p in paths]
    return ex, jobs, threading


@pytest.mark.parametrize("workers", [2, 0])
def test_pipeline_mixes_images_in_full_batches_and_yields_in_order(tmp_path, workers):
    """Windows of several images share a batch (all full but the last), the network runs
    outside the caller's thread, and images come out in job order, skips in place, each
    with the descriptors of its own windows."""
    bb = _Recording()
    ex, jobs, threading = _pipeline(tmp_path, 12, 8, bb, workers)
    outs = list(ex.extract(jobs, progress=False))
    assert [o.job.path if isinstance(o, Extracted) else o.path for o in outs] == [j.path for j in jobs]
    assert [type(o) for o in outs] == [Extracted] * 3 + [Skipped] + [Extracted] * 9
    assert bb.batches == [8] * 7 + [4]  # 12 images x 5 windows = 60
    assert threading.get_ident() not in bb.threads
    alone = Extractor(ex.config, RuntimeConfig(device="cpu", batch_size=5, workers=1))
    alone._backbone = _Recording()
    for job, out in zip(jobs, outs):
        if isinstance(out, Extracted):
            (ref,) = alone.extract([job], progress=False)
            for name in ("level1", "level2"):
                np.testing.assert_array_equal(out.descriptors[name], ref.descriptors[name])
    assert ex.timings["inputs"] == 60 and ex.timings["network"] > 0


def test_pipeline_stops_with_its_caller_and_raises_network_errors_there(tmp_path):
    ex, jobs, threading = _pipeline(tmp_path, 12, 5, _Recording())
    gen = ex.extract(jobs, progress=False)
    first = next(gen)
    assert isinstance(first, Extracted)
    gen.close()  # the caller stops early: the network thread ends, nothing is left running
    assert not [t for t in threading.enumerate() if t.name == "retrieval-network"]
    ex._backbone = _Recording(fail_at=2)
    with pytest.raises(RuntimeError, match="the network broke"):
        list(ex.extract(jobs, progress=False))
    assert not [t for t in threading.enumerate() if t.name == "retrieval-network"]


def test_large_jpeg_is_decoded_at_the_scale_its_windows_need(tmp_path):
    # 640 x 480 and windows of levels 1-2 at 64 px: the level-2 window (2/3 of the side)
    # needs 96 x 96, so the JPEG decodes at 1/4 (160 x 120); the full size is still reported.
    from retrieval.extraction.inputs import decode_need, prepare_inputs
    from retrieval.extraction.images import load_rgb_at_least

    path = tmp_path / "big.jpg"
    make_scene(3, (640, 480)).save(path, quality=95)
    regions = (level_regions(1), level_regions(2))
    assert decode_need(Job(str(path), regions), (64, 64), "crop") == pytest.approx((96, 96))
    img, full = load_rgb_at_least(path, (96, 96))
    assert img.size == (160, 120) and full == (640, 480)
    assert load_rgb_at_least(path, (200, 96))[0].size == (320, 240)  # 1/4 would leave 160 < 200
    assert load_rgb_at_least(path, None)[0].size == (640, 480)
    assert decode_need(Job(str(path), regions, crop=(0, 0, 300, 300)), (64, 64), "crop") is None
    # The inputs cut from the reduced decode are those of the full one within JPEG noise.
    (w, h), reduced = prepare_inputs(Job(str(path), regions), (64, 64), "crop")
    assert (w, h) == (640, 480)
    ex, out = _extract(path, "crop", regions)
    assert (out.width, out.height) == (640, 480)
    full_img = load_rgb(path)
    for box, arr in zip(np.concatenate([r.boxes for r in regions]) * [640, 480, 640, 480], reduced):
        exact = np.asarray(full_img.resize((64, 64), Image.BILINEAR, box=tuple(float(v) for v in box)))
        assert np.abs(exact.astype(float) - arr).mean() < 2.0


def test_reduced_decode_follows_exif_orientation(tmp_path):
    from retrieval.extraction.images import load_rgb_at_least

    exif = Image.Exif()
    exif[0x0112] = 6  # stored 640 x 320, shown 320 x 640
    path = tmp_path / "turned.jpg"
    make_scene(4, (640, 320)).save(path, exif=exif, quality=95)
    img, full = load_rgb_at_least(path, (150, 100))  # upright: 320 / 150 -> 1/2, 640 / 100 -> 1/4
    assert full == (320, 640) and img.size == (160, 320)


def test_multi_picture_jpeg_is_decoded_reduced_too(tmp_path):
    from retrieval.extraction.images import load_rgb_at_least

    path = tmp_path / "camera.mpo"
    make_scene(5, (640, 480)).save(path, save_all=True, append_images=[make_scene(6, (640, 480))], format="MPO")
    img, full = load_rgb_at_least(path, (150, 100))
    assert full == (640, 480) and img.size == (160, 120)
