import numpy as np
import pytest

from retrieval.extraction.patches import jitter_regions, level_boxes, pixel_boxes, region_set


def test_level_windows_of_a_300x200_image():
    # Level l: l x l windows of side 2/(l+1), starting every 1/(l+1), row-major.
    expected = {
        1: [[0, 0, 300, 200]],
        2: [[0, 0, 200, 200 * 2 / 3], [100, 0, 300, 200 * 2 / 3],
            [0, 200 / 3, 200, 200], [100, 200 / 3, 300, 200]],
        3: [[x, y, x + 150, y + 100] for y in (0, 50, 100) for x in (0, 75, 150)],
        4: [[x, y, x + 120, y + 80] for y in (0, 40, 80, 120) for x in (0, 60, 120, 180)],
    }
    for level, boxes in expected.items():
        got = pixel_boxes(level_boxes(level), 300, 200)
        np.testing.assert_allclose(got, np.array(boxes, dtype=float), atol=1e-9)


@pytest.mark.parametrize("level,count,area", [(1, 1, 1.0), (2, 4, 4 / 9), (3, 9, 4 / 16), (4, 16, 4 / 25)])
def test_window_counts_areas_and_borders(level, count, area):
    boxes = level_boxes(level)
    assert len(boxes) == count
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    np.testing.assert_allclose(areas, area)
    # Outer windows touch the borders; nothing leaves the image.
    assert boxes[:, :2].min() == 0 and np.isclose(boxes[:, 2:].max(), 1.0)
    assert (boxes >= 0).all() and (boxes <= 1 + 1e-12).all()


def test_jitter_is_corners_centre_whole_and_mirrors():
    rs = jitter_regions()
    assert len(rs) == 12 and rs.flips.sum() == 6
    np.testing.assert_array_equal(rs.boxes[:6], rs.boxes[6:])
    assert [0, 0, 1, 1] in rs.boxes.tolist()
    assert region_set("jitter12") is rs and region_set("level3").name == "level3"
    with pytest.raises(ValueError):
        region_set("level-x")
