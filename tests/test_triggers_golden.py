"""Triggers equal to the survey toolkit's bytes on the golden inputs of
``../shared/reference/triggers.npz`` (FORK's own functions run on CIFAR-10 test images 0-15):
BadNets at 32 and 64 px, Blended (with the Hello Kitty image, and with the stored float pattern),
SIG at delta 20 and 40, BPP, and WaNet's grid, float warp and stored uint8 test images. The
toolkit truncates to uint8; ``rounding: "round"`` (bdsweep's corrected behaviour) differs by at
most one level."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bdsweep.attacks import HookContext, ResourceContext, apply_in_batches
from bdsweep.attacks.bpp import BPPParams
from bdsweep.attacks.bpp import make_hook as bpp_hook
from bdsweep.attacks.wanet import WaNetParams, identity_grid, warp_normalised
from bdsweep.attacks.wanet import make_hook as wanet_hook
from bdsweep.data.sources.torchvision_datasets import CIFAR10_MEAN, CIFAR10_STD
from bdsweep.engine import Normalisation
from bdsweep.registry import ATTACKS
from conftest import SHARED, SHARED_RESOURCES, requires_shared

GOLDEN = SHARED / "reference" / "triggers.npz"
KITTY = SHARED_RESOURCES / "blended" / "hello_kitty.jpeg"
CIFAR10 = Normalisation(CIFAR10_MEAN, CIFAR10_STD, hflip=True)
pytestmark = requires_shared(GOLDEN)


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as data:
        return {key: data[key] for key in data.files}


def stamp(name, images, **overrides):
    attack = ATTACKS.get(name)
    params = attack.params(**overrides)
    resource = attack.make_resource(ResourceContext(images.shape[1]), params)
    return attack.apply_trigger(images, resource, params), resource


def at_most_one_level_apart(a, b):
    difference = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return difference.max() <= 1 and difference.any()


@pytest.mark.parametrize("size", [32, 64])
def test_badnets_equals_the_toolkit_at_32_and_64_px(golden, size):
    stamped, resource = stamp("badnets", golden[f"x{size}"])
    assert (stamped == golden[f"badnets{size}"]).all()
    if size == 64:  # the toolkit's 32-px trigger image, bilinearly resized: a graded 7x7 patch
        rows, cols = np.nonzero(resource["mask"])
        assert (rows.min(), cols.min(), int(resource["mask"].sum())) == (57, 57, 49)
        assert sorted(np.unique(resource["pattern"]))[:5] == [0, 16, 48, 64, 143]


def test_badnets_nearest_resize_keeps_the_old_sharp_square(golden):
    stamped, resource = stamp("badnets", golden["x64"], resize="nearest")
    assert int(resource["mask"].sum()) == 36 and (stamped[:, 58:, 58:] == 255).all()
    assert not (stamped == golden["badnets64"]).all()


@requires_shared(SHARED_RESOURCES / "badnet" / "trigger_image.png")
def test_badnets_draws_the_toolkits_trigger_image():
    from PIL import Image

    with Image.open(SHARED_RESOURCES / "badnet" / "trigger_image.png") as image:
        reference = np.asarray(image.convert("RGB"))
    _, resource = stamp("badnets", np.zeros((1, 32, 32, 3), np.uint8))
    assert (resource["pattern"] == reference).all()


def test_blended_arithmetic_on_the_stored_pattern(golden):
    """The blend alone, on the toolkit's own float pattern (no JPEG decoding involved)."""
    attack = ATTACKS.get("blended")
    pattern = golden["blended32_pattern"]
    resource = {"pattern": np.rint(pattern).astype(np.uint8)}
    truncated = attack.apply_trigger(golden["x32"], resource, attack.params())
    assert (truncated == golden["blended32"]).all()
    rounded = attack.apply_trigger(golden["x32"], resource, attack.params(rounding="round"))
    assert at_most_one_level_apart(rounded, golden["blended32"])


@requires_shared(KITTY)
def test_blended_with_hello_kitty_equals_the_toolkit(golden):
    stamped, resource = stamp("blended", golden["x32"], image=str(KITTY))
    unit = resource["pattern"].astype(np.float32) / np.float32(255)
    assert (unit * np.float32(255) == golden["blended32_pattern"]).all()
    assert (stamped == golden["blended32"]).all()


@pytest.mark.parametrize("delta", [20, 40])
def test_sig_equals_the_toolkit(golden, delta):
    stamped, _ = stamp("sig", golden["x32"], delta=float(delta))
    assert (stamped == golden[f"sig32_delta{delta}"]).all()
    rounded, _ = stamp("sig", golden["x32"], delta=float(delta), rounding="round")
    assert at_most_one_level_apart(rounded, golden[f"sig32_delta{delta}"])


def hook_context(images: np.ndarray, ratio: float = 0.1, batch: int = 128) -> HookContext:
    n = max(batch, len(images))
    pixels = torch.zeros((n, 32, 32, 3), dtype=torch.uint8)
    pixels[:len(images)] = torch.from_numpy(images)
    return HookContext(pixels, torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.bool), CIFAR10, 10, 32,
                       0, ratio, 0, progress=False)


def test_bpp_test_images_equal_the_toolkit(golden):
    hook = bpp_hook(hook_context(golden["x32"]), BPPParams())
    stored = apply_in_batches(golden["x32"], hook.trigger, torch.device("cpu"), rounding=hook.rounding)
    assert (stored == golden["bpp32"]).all()
    rounded = bpp_hook(hook_context(golden["x32"]), BPPParams(rounding="round"))
    again = apply_in_batches(golden["x32"], rounded.trigger, torch.device("cpu"), rounding=rounded.rounding)
    assert at_most_one_level_apart(again, golden["bpp32"])


def test_wanet_grid_from_the_toolkits_offsets(golden):
    import torch.nn.functional as F

    offsets = torch.from_numpy(golden["wanet_ins"])
    assert torch.equal(identity_grid(32), torch.from_numpy(golden["wanet_identity_grid"]))
    field = F.interpolate(offsets, size=32, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    assert torch.allclose(field, torch.from_numpy(golden["wanet_noise_grid"]), atol=1e-6)
    grid = (identity_grid(32) + 0.5 * field / 32 * 1.0).clamp(-1, 1)
    assert torch.allclose(grid, torch.from_numpy(golden["wanet_grid"]), atol=1e-6)


def test_wanet_warp_and_stored_test_images_equal_the_toolkit(golden):
    grid = torch.from_numpy(golden["wanet_grid"])
    unit = torch.from_numpy(golden["x32"]).permute(0, 3, 1, 2).float().div(255)
    warped = warp_normalised(unit, grid, CIFAR10)
    assert torch.allclose(warped, torch.from_numpy(golden["wanet32_float"]), atol=1e-5)
    hook = wanet_hook(hook_context(golden["x32"]), WaNetParams())
    hook.grid = grid  # the toolkit's grid (its global RNG state cannot be reproduced)
    stored = apply_in_batches(golden["x32"], hook.trigger, torch.device("cpu"), rounding=hook.rounding)
    assert hook.rounding == "truncate" and (stored == golden["wanet32"]).all()


@pytest.mark.parametrize("ratio, batch, expected", [(0.1, 128, (12, 24)), (0.05, 128, (6, 12)), (0.01, 128, (1, 2)),
                                                    (0.1, 100, (10, 20))])
def test_wanet_cross_count_as_the_toolkit_computes_it(ratio, batch, expected):
    """num_bd = int(ratio * batch), num_cross = int(num_bd * cross_ratio): 24 at 10 % of 128, not 25."""
    hook = wanet_hook(hook_context(np.zeros((0, 32, 32, 3), np.uint8), ratio, batch), WaNetParams())
    captured = []
    hook.split_counts = lambda indices, *counts: captured.append(counts) or [torch.arange(c) for c in counts]
    images = torch.rand(batch, 3, 32, 32)
    hook.poison(images, torch.zeros(batch, dtype=torch.long), torch.arange(batch))
    assert captured == [expected]


LF_FILES = SHARED_RESOURCES / "lowFrequency"


@requires_shared(LF_FILES)
@pytest.mark.parametrize("name", ["cifar10_preactresnet18", "cifar10_efficientnet_b3", "cifar10_mobilenet_v3_large",
                                  "cifar10_vgg19_bn"])
def test_lf_trigger_file_gives_the_toolkits_bytes(golden, name):
    """A ready LF file (``pattern``) applied as the toolkit's SimpleAdditiveTrigger:
    uint8(clip(float64(x) + float64(trigger), 0, 255)). The VGG19-BN file holds [0, 0.2]: a no-op."""
    path = LF_FILES / f"{name}_0_255.npy"
    stamped, _ = stamp("lf", golden["x32"], pattern=str(path))
    trigger = np.load(path).astype(np.float64).reshape(32, 32, 3)
    toolkit = np.clip(golden["x32"].astype(np.float64) + trigger, 0, 255).astype(np.uint8)
    assert (stamped == toolkit).all()
    assert (stamped == golden["x32"]).all() == (name == "cifar10_vgg19_bn")


def test_lf_float_pattern_truncates_as_the_toolkit(tmp_path, golden):
    trigger = np.random.default_rng(0).uniform(-3, 40, (32, 32, 3))
    np.save(tmp_path / "lf.npy", trigger)
    stamped, _ = stamp("lf", golden["x32"], pattern=str(tmp_path / "lf.npy"))
    assert (stamped == np.clip(golden["x32"] + trigger, 0, 255).astype(np.uint8)).all()
    rounded, _ = stamp("lf", golden["x32"], pattern=str(tmp_path / "lf.npy"), rounding="round")
    assert at_most_one_level_apart(rounded, stamped)
