import numpy as np
import pytest

from bdsweep.attacks import ResourceContext
from bdsweep.registry import ATTACKS
from conftest import SHARED_RESOURCES, requires_shared


def stamp(images):
    attack = ATTACKS.get("badnets")
    params = attack.params()
    return attack.apply_trigger(images, attack.make_resource(ResourceContext(images.shape[1]), params), params)


def test_three_by_three_white_square_in_the_bottom_right_corner_at_32px():
    images = np.random.default_rng(0).integers(0, 200, size=(5, 32, 32, 3), dtype=np.uint8)
    stamped = stamp(images)
    assert stamped.dtype == np.uint8 and stamped.shape == images.shape
    assert (stamped[:, 29:, 29:, :] == 255).all()
    changed = np.argwhere((stamped != images).any(axis=(0, 3)))
    assert changed.min(0).tolist() == [29, 29] and changed.max(0).tolist() == [31, 31]
    untouched = np.ones((32, 32), bool)
    untouched[29:, 29:] = False
    assert (stamped[:, untouched] == images[:, untouched]).all()


def test_trigger_image_is_resized_bilinearly_at_64px():
    """As the toolkit: its 32-px trigger image resized bilinearly, a graded 7x7 patch (rows and
    columns 57-63) whose inner 5x5 is white; exact bytes: test_triggers_golden.py."""
    stamped = stamp(np.zeros((2, 64, 64, 3), np.uint8))
    assert np.argwhere(stamped[0, :, :, 0] > 0).min(0).tolist() == [57, 57]
    assert int((stamped[0, :, :, 0] > 0).sum()) == 49 and int((stamped[0, :, :, 0] == 255).sum()) == 25


def test_nearest_resize_gives_a_six_by_six_white_square_at_64px():
    attack = ATTACKS.get("badnets")
    params = attack.params(resize="nearest")
    resource = attack.make_resource(ResourceContext(64), params)
    stamped = attack.apply_trigger(np.zeros((2, 64, 64, 3), np.uint8), resource, params)
    assert np.argwhere(stamped[0, :, :, 0] == 255).min(0).tolist() == [58, 58]
    assert int((stamped[0, :, :, 0] == 255).sum()) == 36 == int((stamped[0, :, :, 0] > 0).sum())


@requires_shared(SHARED_RESOURCES / "badnet" / "trigger_image.png")
def test_matches_the_reference_toolkit_trigger_image():
    from PIL import Image

    reference = np.asarray(Image.open(SHARED_RESOURCES / "badnet" / "trigger_image.png").convert("RGB"))
    ours = stamp(np.zeros((1, 32, 32, 3), np.uint8))[0]
    assert (ours == reference).all()


def test_unknown_attack_hyperparameter_is_named():
    from bdsweep.params import resolve

    with pytest.raises(KeyError, match="'colour'"):
        resolve(ATTACKS.get("badnets").params, {"colour": 3}, "attack 'badnets'")


def test_below_32_px_the_square_stays_white_and_sharp():
    """The toolkit never shrinks its trigger image; bdsweep shrinks it by nearest neighbour (2x2 at 16 px)."""
    attack = ATTACKS.get("badnets")
    params = attack.params()
    resource = attack.make_resource(ResourceContext(16), params)
    expected = np.zeros((16, 16), dtype=bool)
    expected[14:, 14:] = True
    assert np.array_equal(resource["mask"], expected)
    assert (resource["pattern"][expected] == 255).all()
