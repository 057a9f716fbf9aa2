"""Poisoning throughput: each data-poisoning attack's whole-array trigger vs a straightforward
per-image PIL reference (the per-sample transform of a torchvision-style dataset) that produces
the same bytes. Reports images per second for both and their ratio (SPEC target: at least 50x).

    python benchmarks/poison_throughput.py [--images 10000] [--size 32] [--out FILE.json]

The reference for BadNets pastes the patch with PIL; for the additive and blending attacks it
converts each image to PIL and back and applies the same formula to that one image; for SSBA it
runs the encoder on one image at a time. Outputs are compared byte for byte before timing counts,
except SSBA's: a convolution's float result depends on the batch size it runs in, so a per-image
encoder can round a few pixels to the neighbouring value (at most 1 level; the share is reported).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))

from bdsweep.attacks import ResourceContext, apply_in_batches  # noqa: E402
from bdsweep.attacks.ssba import load_encoder, trigger_code  # noqa: E402
from bdsweep.engine import Normalisation  # noqa: E402
from bdsweep.models import create_model  # noqa: E402
from bdsweep.registry import ATTACKS  # noqa: E402


def per_image(images: np.ndarray, function) -> np.ndarray:
    return np.stack([np.asarray(function(Image.fromarray(image))) for image in images])


def reference_badnets(images, resource, params):
    patch = Image.fromarray(resource["pattern"])
    mask = Image.fromarray(resource["mask"].astype(np.uint8) * 255)

    def stamp(image):
        image.paste(patch, (0, 0), mask)
        return image

    return per_image(images, stamp)


def formula_per_image(formula):
    """A reference that applies ``formula(float image) -> float image`` to one PIL image at a time."""

    def reference(images, resource, params):
        # The attack's own rule for a fractional result: truncation (the toolkit's uint8 cast) or rounding.
        whole = np.floor if getattr(params, "rounding", "round") == "truncate" else np.rint

        def one(image):
            pixels = np.asarray(image, dtype=np.float64)
            return Image.fromarray(np.clip(whole(formula(pixels, resource, params)), 0, 255).astype(np.uint8))

        return per_image(images, one)

    return reference


def reference_ssba(images, resource, params):
    device = torch.device("cpu")
    encoder = load_encoder(resource, params, device)

    code = torch.from_numpy(trigger_code(params))[None]

    def one(image):
        stamped = apply_in_batches(np.asarray(image)[None], lambda x: encoder(x, code), device, batch_size=1)
        return Image.fromarray(stamped[0])

    return per_image(images, one)


REFERENCES = {
    "badnets": reference_badnets,
    # The toolkit's float32 pattern (ToTensor, then * 255) times alpha, as bdsweep.attacks.blended reproduces it.
    "blended": formula_per_image(lambda x, r, p: (1 - p.alpha) * x + (
        r["pattern"].astype(np.float32) / np.float32(255) * np.float32(255) * np.float32(p.alpha)).astype(np.float64)),
    "sig": formula_per_image(lambda x, r, p: x + r["signal"][:, :, None]),
    "lf": formula_per_image(lambda x, r, p: x + np.rint(r["perturbation"])),
    "ssba": reference_ssba,
}
TOLERANCE = {"ssba": 1}  # pixel levels (see the module docstring)
# Cheap resources: throughput does not depend on how well a learned trigger was trained.
RESOURCE_OVERRIDES = {"lf": {"steps": 2, "batch_size": 8, "images": 64},
                      "ssba": {"steps": 2, "epochs": 1, "train_images": 64, "eval_images": 8}}


def timed(function, *args, repeat: int = 3) -> tuple[np.ndarray, float]:
    """The output and the best of ``repeat`` wall times (the first call also pays page faults)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        out = function(*args)
        best = min(best, time.perf_counter() - started)
    return out, best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--reference-images", type=int, default=1000, help="the reference is timed on fewer")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--attacks", nargs="*", default=list(REFERENCES))
    parser.add_argument("--out", help="also write the results as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as a poison job runs (threads: 1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.images, args.size, args.size, 3), dtype=np.uint8)
    labels = np.arange(args.images) % 10
    rows = []
    for name in args.attacks:
        attack = ATTACKS.get(name)
        params = attack.params(**RESOURCE_OVERRIDES.get(name, {}))
        context = ResourceContext(args.size, 10, 0, 0, torch.device("cpu"), Normalisation((0.5,) * 3, (0.25,) * 3,
                                  False), images, labels, create_model("small_cnn", 10, args.size))
        resource = attack.make_resource(context, params)
        ours, ours_seconds = timed(attack.apply_trigger, images, resource, params)
        count = min(args.reference_images, args.images) // (10 if name == "ssba" else 1)
        reference, reference_seconds = timed(REFERENCES[name], images[:count], resource, params, repeat=2)
        difference = np.abs(reference.astype(np.int16) - ours[:count])
        if difference.max() > TOLERANCE.get(name, 0):
            raise SystemExit(f"{name}: the reference differs by up to {difference.max()} levels")
        ours_rate, reference_rate = args.images / ours_seconds, count / reference_seconds
        rows.append({"attack": name, "ours_images_per_s": ours_rate, "reference_images_per_s": reference_rate,
                     "speedup": ours_rate / reference_rate, "differing_bytes": float((difference > 0).mean())})
    print(f"{'attack':8} {'ours img/s':>12} {'per-image PIL img/s':>20} {'ratio':>8} {'bytes differing':>16}")
    for row in rows:
        print(f"{row['attack']:8} {row['ours_images_per_s']:12.0f} {row['reference_images_per_s']:20.0f} "
              f"{row['speedup']:7.1f}x {row['differing_bytes']:16.2e}")
    if args.out:
        Path(args.out).write_text(json.dumps({"images": args.images, "size": args.size, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
