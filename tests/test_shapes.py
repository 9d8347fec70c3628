"""The tiny-shapes data: rendering, captions and the analytic detector."""

import numpy as np
import pytest

from faster_diffusion.quality import shapes


def test_caption_template_and_round_trip():
    assert shapes.caption("blue", "triangle", "top") == "a blue triangle at the top"
    assert shapes.caption("red", "square", "center") == "a red square in the center"
    caps = shapes.all_captions()
    assert len(caps) == len(set(caps)) == 6 * 3 * 5
    for a in shapes.all_attributes():
        assert shapes.parse_caption(shapes.caption(*a)) == a
    assert shapes.parse_caption("A Cyan Circle on the right.") == ("cyan", "circle", "right")
    for bad in ("a red square", "a purple square in the center", "red square on the left", ""):
        with pytest.raises(ValueError):
            shapes.parse_caption(bad)
    with pytest.raises(ValueError):
        shapes.caption("purple", "square", "left")


def test_render_is_deterministic_and_well_formed():
    a = shapes.render("green", "circle", "left", rng=123)
    b = shapes.render("green", "circle", "left", rng=np.random.default_rng(123))
    c = shapes.render("green", "circle", "left", rng=124)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # plain white background in the corners
    assert (a[0, 0] == 255).all() and (a[-1, -1] == 255).all()
    im1, cap1, at1 = shapes.sample(7)
    im2, cap2, at2 = shapes.sample(7)
    assert np.array_equal(im1, im2) and cap1 == cap2 and at1 == at2
    assert shapes.parse_caption(cap1) == at1


def test_detector_on_clean_renders():
    rng = np.random.default_rng(0)
    dets, targets = [], []
    for _ in range(300):
        im, _, a = shapes.sample(rng)
        dets.append(shapes.detect(im))
        targets.append(a)
    score = shapes.score(dets, targets)
    for key in ("colour", "shape", "position"):
        assert score[key] >= 0.98, score
    # every combination is seen in a 300-image sample
    assert len(set(targets)) >= 80


def test_detector_on_every_combination_and_input_types():
    for a in shapes.all_attributes():
        im = shapes.render(*a, jitter=False)
        assert shapes.detect(im).attributes == a
        assert shapes.detect(im.astype(np.float32) / 255.0).attributes == a  # float [0,1] like output_type="np"
    from PIL import Image

    im = shapes.render("magenta", "triangle", "bottom", rng=1)
    assert shapes.detect(Image.fromarray(im)).attributes == ("magenta", "triangle", "bottom")


def test_detector_robust_to_noise_and_blur():
    from scipy import ndimage

    rng = np.random.default_rng(1)
    ok = 0
    for _ in range(60):
        im, _, a = shapes.sample(rng)
        x = ndimage.gaussian_filter(im.astype(np.float64), sigma=(1.0, 1.0, 0)) + rng.normal(0, 8, im.shape)
        ok += shapes.detect(np.clip(x, 0, 255).astype(np.uint8)).attributes == a
    assert ok >= 57


def test_blank_image_detects_nothing():
    d = shapes.detect(np.full((64, 64, 3), 255, np.uint8))
    assert d.attributes == (None, None, None)
    assert shapes.score([d], [shapes.Attributes("red", "square", "center")])["all"] == 0.0
