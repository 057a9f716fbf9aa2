"""Dataset sources and the canonical array store."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bdsweep.cli import main
from bdsweep.data.store import PreparedDataset
from bdsweep.registry import SOURCES
from conftest import synthetic_raw


def prepare(tmp_path, options, name="d"):
    out = tmp_path / "prepared"
    code = main(["prepare", "--name", name, "--options", json.dumps(options), "--out", str(out)])
    return code, out


def test_digits_are_real_upscaled_rgb_images(tmp_path):
    code, out = prepare(tmp_path, {"source": "digits", "image_size": 24})
    assert code == 0
    data = PreparedDataset(out)
    assert data.x_train.shape[1:] == (24, 24, 3) and data.x_train.dtype == np.uint8
    assert len(data.y_train) + len(data.y_test) == 1797 and data.info.num_classes == 10
    assert isinstance(data.x_train, np.memmap)  # later stages read only what they index
    assert (data.x_train[..., 0] == data.x_train[..., 2]).all() and data.x_train.max() == 255
    assert set(np.unique(data.y_test)) == set(range(10))


def test_npz_source_round_trip(tmp_path):
    raw = synthetic_raw()
    np.savez(tmp_path / "user.npz", x_train=raw.x_train, y_train=raw.y_train, x_test=raw.x_test, y_test=raw.y_test)
    code, out = prepare(tmp_path, {"source": "npz", "path": str(tmp_path / "user.npz"), "hflip": True})
    assert code == 0
    data = PreparedDataset(out)
    assert (data.x_train == raw.x_train).all() and (data.y_test == raw.y_test).all()
    assert data.info.class_names == ("0", "1", "2", "3") and data.info.hflip is True
    assert data.info.mean == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("content, message", [
    (b"this is not a zip file", "corrupt .npz file"),
    (None, "lacks array(s) y_test"),
])
def test_bad_npz_is_an_error_naming_the_path(tmp_path, capsys, content, message):
    path = tmp_path / "user.npz"
    if content is None:
        raw = synthetic_raw()
        np.savez(path, x_train=raw.x_train, y_train=raw.y_train, x_test=raw.x_test)
    else:
        path.write_bytes(content)
    code, out = prepare(tmp_path, {"source": "npz", "path": str(path)})
    assert code == 1
    err = capsys.readouterr().err
    assert message in err and str(path) in err
    assert not out.exists()


def test_wrong_image_layout_is_refused(tmp_path, capsys):
    raw = synthetic_raw()
    np.savez(tmp_path / "u.npz", x_train=raw.x_train.transpose(0, 3, 1, 2), y_train=raw.y_train,
             x_test=raw.x_test, y_test=raw.y_test)
    assert prepare(tmp_path, {"source": "npz", "path": str(tmp_path / "u.npz")})[0] == 1
    assert "NHWC" in capsys.readouterr().err


def test_missing_cifar10_root_names_the_path(tmp_path, capsys):
    code, _ = prepare(tmp_path, {"source": "cifar10", "root": str(tmp_path / "nowhere")})
    assert code == 1 and str(tmp_path / "nowhere") in capsys.readouterr().err


def test_truncated_array_is_an_error_naming_the_path(prepared):
    path = prepared.directory / "x_test.npy"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=str(path)):
        PreparedDataset(prepared.directory).array("x_test")


def write_images(paths_and_arrays, fmt):
    from PIL import Image

    for path, array in paths_and_arrays:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path, format=fmt)


def test_tiny_imagenet_folder_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    rng = np.random.default_rng(0)
    wnids = ["n02", "n01", "n03"]  # labels follow the sorted order: n01=0, n02=1, n03=2
    images = []
    for wnid in wnids:
        for i in range(2):
            images.append((root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG",
                           rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    grey = rng.integers(0, 255, (64, 64), dtype=np.uint8)  # a greyscale image, converted to RGB
    images += [(root / "val" / "images" / "val_0.JPEG", grey),
               (root / "val" / "images" / "val_1.JPEG", images[0][1])]
    write_images(images, "JPEG")
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn03\t0\t0\t63\t63\nval_1.JPEG\tn02\t0\t0\t1\t1\n")
    (root / "words.txt").write_text("n01\tgoldfish\nn02\tshark\nn03\tray\n")

    raw = SOURCES.get("tiny-imagenet").load({"root": str(root)})
    assert raw.x_train.shape == (6, 64, 64, 3) and raw.x_test.shape == (2, 64, 64, 3)
    assert raw.y_train.tolist() == [0, 0, 1, 1, 2, 2]
    assert raw.y_test.tolist() == [2, 1]
    assert raw.class_names == ("goldfish", "shark", "ray")
    assert (raw.x_test[0, ..., 0] == raw.x_test[0, ..., 1]).all()


def test_tiny_imagenet_incomplete_layout_names_what_is_missing(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="val_annotations.txt"):
        SOURCES.get("tiny-imagenet").load({"root": str(tmp_path)})


def test_gtsrb_images_are_resized_whole_to_32px(tmp_path):
    base = tmp_path / "gtsrb" / "GTSRB"
    rng = np.random.default_rng(1)
    sizes = [(40, 50), (31, 29), (64, 64)]
    train = [(base / "Training" / f"{label:05d}" / f"{i}.ppm", rng.integers(0, 255, (*size, 3), dtype=np.uint8))
             for i, (label, size) in enumerate(zip((0, 2, 2), sizes))]
    test = [(base / "Final_Test" / "Images" / "00000.ppm", train[1][1])]
    write_images(train + test, "PPM")
    (tmp_path / "gtsrb" / "GT-final_test.csv").write_text(
        "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n00000.ppm;29;31;0;0;28;30;2\n")
    raw = SOURCES.get("gtsrb").load({"root": str(tmp_path)})
    from PIL import Image

    expected = np.asarray(Image.fromarray(train[0][1]).resize((32, 32), Image.BILINEAR))
    assert raw.x_train.shape == (3, 32, 32, 3) and (raw.x_train[0] == expected).all()
    assert raw.y_train.tolist() == [0, 2, 2] and raw.y_test.tolist() == [2]
    assert len(raw.class_names) == 43


@pytest.mark.parametrize("name, shape, classes", [
    ("cifar10", (32, 32, 3), 10), ("gtsrb", (32, 32, 3), 43), ("tiny-imagenet", (64, 64, 3), 200)])
def test_real_datasets_prepare_from_materialized_arrays(tmp_path, materialized, name, shape, classes):
    code, out = prepare(tmp_path, {"source": "npz", "path": str(materialized(name))}, name=name)
    assert code == 0
    data = PreparedDataset(out)
    assert data.x_train.shape[1:] == shape and data.info.num_classes == classes
    assert data.y_train.min() == 0 and data.y_train.max() == classes - 1


def test_cifar10_from_torchvisions_folder_layout(tmp_path, monkeypatch):
    """torchvision's own reader on the python-pickle layout; its MD5 check is bypassed because
    the batches here are synthetic."""
    import pickle

    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, 32, 32, 3), dtype=np.uint8)
    labels = list(range(10)) + [3, 4]

    def batch(chunk):
        return {"data": images[chunk].transpose(0, 3, 1, 2).reshape(len(images[chunk]), -1),
                "labels": [labels[i] for i in range(12)][chunk]}

    for name, chunk in [(f"data_batch_{i}", slice(2 * (i - 1), 2 * i)) for i in range(1, 6)]:
        (folder / name).write_bytes(pickle.dumps(batch(chunk)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(slice(10, 12))))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))

    raw = SOURCES.get("cifar10").load({"root": str(tmp_path)})
    assert (raw.x_train == images[:10]).all() and raw.y_train.tolist() == list(range(10))
    assert (raw.x_test == images[10:]).all() and raw.y_test.tolist() == [3, 4]
    assert raw.class_names[9] == "class9"
    assert SOURCES.get("cifar10").hflip and SOURCES.get("cifar10").mean == (0.4914, 0.4822, 0.4465)
