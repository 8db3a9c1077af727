"""The readers of a user's own data (--data PATH): datasets.read_points (.csv, .npy, .npz) and
datasets.read_images (a folder of PNGs, or a .npy/.npz uint8 array). Each format reads what was
written (the data are made here with numpy and PIL); each bad file is refused with one
ValueError (or FileNotFoundError) whose message names the file and the problem.
"""
import os

import numpy as np
import pytest
from PIL import Image

import datasets

POINTS = np.array([[0.5, -1.25], [2.0, 3.0], [-0.125, 1e-3], [7.0, -8.5], [1e4, -2e-4]])
LABELS = np.array([0, 1, 1, 2, 0])


def write_csv(path, rows, header=None):
    lines = ([header] if header else []) + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def refused(reader, path, *phrases, error=ValueError):
    """The reader's one-line error on path: it names the file and each phrase."""
    with pytest.raises(error) as err:
        reader(str(path))
    message = str(err.value)
    assert str(path) in message and "\n" not in message, message
    for phrase in phrases:
        assert phrase in message, message
    return message


# --- points: each format ----------------------------------------------------------------------

@pytest.mark.parametrize("header", [None, "x,y"])
def test_csv_two_columns(tmp_path, header):
    x, y = datasets.read_points(write_csv(tmp_path / "p.csv", POINTS, header))
    assert x.dtype == np.float64 and np.array_equal(x, POINTS) and y is None


@pytest.mark.parametrize("header", [None, "x,y,label"])
def test_csv_with_labels(tmp_path, header):
    rows = [list(p) + [k] for p, k in zip(POINTS, LABELS)]
    x, y = datasets.read_points(write_csv(tmp_path / "p.csv", rows, header))
    assert np.array_equal(x, POINTS) and y.dtype == np.int64 and np.array_equal(y, LABELS)
    # whole numbers written as floats are labels too
    rows = [list(p) + [f"{k}.0"] for p, k in zip(POINTS, LABELS)]
    assert np.array_equal(datasets.read_points(write_csv(tmp_path / "q.csv", rows))[1], LABELS)


def test_csv_blank_lines_and_spaces(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("x, y\n\n0.5, -1.25\n 2.0 ,3\n\n")
    x, y = datasets.read_points(str(path))
    assert np.array_equal(x, [[0.5, -1.25], [2.0, 3.0]]) and y is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_npy(tmp_path, dtype):
    np.save(tmp_path / "p.npy", POINTS.astype(dtype))
    x, y = datasets.read_points(str(tmp_path / "p.npy"))
    assert x.dtype == np.float64 and np.array_equal(x, POINTS.astype(dtype)) and y is None


def test_npz_with_and_without_labels(tmp_path):
    np.savez(tmp_path / "a.npz", x=POINTS)
    x, y = datasets.read_points(str(tmp_path / "a.npz"))
    assert np.array_equal(x, POINTS) and y is None
    np.savez(tmp_path / "b.npz", x=POINTS.astype(np.float32), y=LABELS.astype(np.int32))
    x, y = datasets.read_points(str(tmp_path / "b.npz"))
    assert np.array_equal(x, POINTS.astype(np.float32)) and x.dtype == np.float64
    assert y.dtype == np.int64 and np.array_equal(y, LABELS)


# --- points: bad data -------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_points_not_finite(tmp_path, bad):
    rows = [list(p) for p in POINTS]
    rows[2][1] = bad
    refused(datasets.read_points, write_csv(tmp_path / "p.csv", rows), "NaN or inf")
    values = POINTS.copy()
    values[3, 0] = float(bad)
    np.save(tmp_path / "p.npy", values)
    refused(datasets.read_points, tmp_path / "p.npy", "NaN or inf")
    np.savez(tmp_path / "p.npz", x=values, y=LABELS)
    refused(datasets.read_points, tmp_path / "p.npz", "NaN or inf")


def test_points_wrong_columns(tmp_path):
    # one column, four columns, rows of different lengths
    refused(datasets.read_points, write_csv(tmp_path / "a.csv", POINTS[:, :1]), "2 numeric columns",
            "[1]")
    rows = np.concatenate([POINTS, POINTS], 1)
    refused(datasets.read_points, write_csv(tmp_path / "b.csv", rows), "2 numeric columns", "[4]")
    path = tmp_path / "c.csv"
    path.write_text("1,2\n3,4,0\n5,6\n")
    refused(datasets.read_points, path, "2 numeric columns", "[2, 3]")
    # a word among the numbers (not in the first line, which could be a header)
    path.write_text("1,2\n3,four\n5,6\n")
    refused(datasets.read_points, path, "not a number")


@pytest.mark.parametrize("shape", [(5, 3), (5, 1), (10,), (5, 2, 1)])
def test_points_wrong_shape(tmp_path, shape):
    np.save(tmp_path / "p.npy", np.zeros(shape))
    refused(datasets.read_points, tmp_path / "p.npy", "shape (n, 2)", str(shape))
    np.savez(tmp_path / "p.npz", x=np.zeros(shape))
    refused(datasets.read_points, tmp_path / "p.npz", "shape (n, 2)", str(shape))


@pytest.mark.parametrize("label, phrase", [("0.5", "whole numbers"), ("-1", "whole numbers"),
                                           ("cat", "not a number"), ("nan", "whole numbers"),
                                           ("inf", "whole numbers")])
def test_points_bad_labels_csv(tmp_path, label, phrase):
    rows = [list(p) + [k] for p, k in zip(POINTS, LABELS)]
    rows[1][2] = label
    refused(datasets.read_points, write_csv(tmp_path / "p.csv", rows), "label", phrase)


def test_points_bad_labels_npz(tmp_path):
    np.savez(tmp_path / "a.npz", x=POINTS, y=LABELS + 0.5)
    refused(datasets.read_points, tmp_path / "a.npz", "whole numbers")
    np.savez(tmp_path / "b.npz", x=POINTS, y=LABELS[:, None].repeat(2, 1))  # not one per sample
    refused(datasets.read_points, tmp_path / "b.npz", "whole numbers")
    np.savez(tmp_path / "c.npz", x=POINTS, y=LABELS[:3])
    refused(datasets.read_points, tmp_path / "c.npz", "3 labels for 5 samples")
    np.savez(tmp_path / "d.npz", x=POINTS.astype(str))
    refused(datasets.read_points, tmp_path / "d.npz", "not numbers")


def test_points_empty(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    refused(datasets.read_points, tmp_path / "empty.csv", "no data rows")
    (tmp_path / "header.csv").write_text("x,y\n")
    refused(datasets.read_points, tmp_path / "header.csv", "no data rows")
    np.save(tmp_path / "empty.npy", np.zeros((0, 2)))
    refused(datasets.read_points, tmp_path / "empty.npy", "shape (n, 2)", "(0, 2)")
    (tmp_path / "zero.npy").write_bytes(b"")  # a file of no bytes
    refused(datasets.read_points, tmp_path / "zero.npy", "not a readable numpy file")
    (tmp_path / "zero.npz").write_bytes(b"")
    refused(datasets.read_points, tmp_path / "zero.npz", "not a readable numpy file")
    np.savez(tmp_path / "other.npz", points=POINTS)
    refused(datasets.read_points, tmp_path / "other.npz", "array named x", "points")


@pytest.mark.parametrize("name", ["missing.csv", "missing.npy", "missing.npz"])
def test_points_missing_file(tmp_path, name):
    message = refused(datasets.read_points, tmp_path / name, error=FileNotFoundError)
    assert "no such file" in message.lower()


def test_points_other_formats(tmp_path):
    (tmp_path / "p.txt").write_text("1 2\n3 4\n")
    refused(datasets.read_points, tmp_path / "p.txt", ".csv, .npy or .npz", ".txt")
    (tmp_path / "p.npy").write_text("1,2\n3,4\n")  # text named .npy
    refused(datasets.read_points, tmp_path / "p.npy", "not a readable numpy file")


# --- images: each format ----------------------------------------------------------------------

def grey(seed, size=(6, 4)):
    """A uint8 (H, W) image with every level of a seeded draw (size: PIL's (W, H))."""
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0]), dtype=np.uint8)


def rgb(seed, size=(6, 4)):
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


@pytest.mark.parametrize("colour", ["grey", "rgb"])
def test_flat_folder(tmp_path, colour):
    make = grey if colour == "grey" else rgb
    names = ["b.png", "a.png", "c.PNG"]
    for k, name in enumerate(names):
        save(tmp_path / "imgs" / name, make(k))
    x, y, files = datasets.read_images(str(tmp_path / "imgs"))
    assert y is None and files == sorted(names)  # in name order, no labels
    assert x.dtype == np.uint8 and x.shape == (3, 1 if colour == "grey" else 3, 4, 6)
    assert x.flags["C_CONTIGUOUS"]
    for image, name in zip(x, files):
        expected = make(names.index(name))
        assert np.array_equal(image[0] if colour == "grey" else image.transpose(1, 2, 0), expected)


def test_class_folders_label_as_image_folder(tmp_path):
    # labels from the sub-folders' names, in sorted order, as torchvision's ImageFolder gives them
    torchvision = pytest.importorskip("torchvision")
    root = tmp_path / "imgs"
    layout = {"dog": ["2.png", "1.png"], "cat": ["z.png"], "bird": ["a.png", "b.png", "c.png"]}
    written = {}
    for k, (folder, names) in enumerate(layout.items()):
        for j, name in enumerate(names):
            written[f"{folder}/{name}"] = rgb(10 * k + j)
            save(root / folder / name, written[f"{folder}/{name}"])
    x, y, files = datasets.read_images(str(root))
    reference = torchvision.datasets.ImageFolder(str(root))
    assert reference.classes == ["bird", "cat", "dog"]
    assert files == [os.path.relpath(path, root) for path, _ in reference.samples]
    assert y.dtype == np.int64 and y.tolist() == reference.targets == [0, 0, 0, 1, 2, 2]
    for image, name in zip(x, files):
        assert np.array_equal(image.transpose(1, 2, 0), written[name.replace("\\", "/")])


def test_class_folders_of_grey_images(tmp_path):
    for k, folder in enumerate(["0", "1"]):
        for j in range(2):
            save(tmp_path / folder / f"{j}.png", grey(2 * k + j))
    x, y, files = datasets.read_images(str(tmp_path))
    assert x.shape == (4, 1, 4, 6) and y.tolist() == [0, 0, 1, 1]
    assert np.array_equal(x[3, 0], grey(3))


@pytest.mark.parametrize("ext", ["npy", "npz"])
@pytest.mark.parametrize("channels", [None, 1, 3])
def test_image_arrays(tmp_path, ext, channels):
    rng = np.random.default_rng(0)
    shape = (5, 4, 6) if channels is None else (5, 4, 6, channels)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / f"imgs.{ext}"
    if ext == "npy":
        np.save(path, images)
    else:
        np.savez(path, x=images, y=LABELS)
    x, y, files = datasets.read_images(str(path))
    assert x.dtype == np.uint8 and x.shape == (5, channels or 1, 4, 6) and files is None
    expected = images[:, None] if channels is None else images.transpose(0, 3, 1, 2)
    assert np.array_equal(x, expected) and x.flags["C_CONTIGUOUS"]
    assert y is None if ext == "npy" else (y.dtype == np.int64 and np.array_equal(y, LABELS))


# --- images: bad data -------------------------------------------------------------------------

def test_images_of_mixed_sizes_or_modes(tmp_path):
    save(tmp_path / "sizes" / "a.png", grey(0))
    save(tmp_path / "sizes" / "b.png", grey(1, size=(6, 5)))
    message = refused(datasets.read_images, tmp_path / "sizes", "one size and mode")
    assert "b.png" in message and "(5, 6)" in message and "(4, 6)" in message
    save(tmp_path / "modes" / "a.png", grey(0))
    save(tmp_path / "modes" / "b.png", rgb(1))
    message = refused(datasets.read_images, tmp_path / "modes", "one size and mode")
    assert "b.png is RGB" in message and "a.png L" in message
    # across class folders too
    save(tmp_path / "classes" / "x" / "a.png", rgb(0))
    save(tmp_path / "classes" / "y" / "b.png", rgb(1, size=(4, 6)))
    refused(datasets.read_images, tmp_path / "classes", "b.png", "one size and mode")


def test_images_of_other_modes(tmp_path):
    save(tmp_path / "rgba" / "a.png", np.zeros((4, 6, 4), np.uint8), "RGBA")
    refused(datasets.read_images, tmp_path / "rgba", "a.png is a RGBA image", "grey (L) or RGB")


def test_a_file_that_is_not_an_image(tmp_path):
    save(tmp_path / "text" / "a.png", grey(0))
    (tmp_path / "text" / "notes.txt").write_text("not an image")
    refused(datasets.read_images, tmp_path / "text", "notes.txt is not a PNG or JPEG image")
    # named .png but not one
    save(tmp_path / "fake" / "a.png", grey(0))
    (tmp_path / "fake" / "b.png").write_text("not an image")
    refused(datasets.read_images, tmp_path / "fake", "cannot read b.png")
    # a folder inside a class folder
    save(tmp_path / "deep" / "cat" / "a.png", grey(0))
    save(tmp_path / "deep" / "cat" / "more" / "b.png", grey(1))
    refused(datasets.read_images, tmp_path / "deep", "more is not a PNG or JPEG image")


def test_empty_image_data(tmp_path):
    (tmp_path / "empty").mkdir()
    refused(datasets.read_images, tmp_path / "empty", "no images")
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    refused(datasets.read_images, tmp_path / "classes", "no images")
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "a.png").write_bytes(b"")  # a file of no bytes
    refused(datasets.read_images, tmp_path / "zero", "cannot read a.png")
    np.save(tmp_path / "none.npy", np.zeros((0, 4, 6), np.uint8))
    refused(datasets.read_images, tmp_path / "none.npy", "no images")
    (tmp_path / "zero.npy").write_bytes(b"")
    refused(datasets.read_images, tmp_path / "zero.npy", "not a readable numpy file")


@pytest.mark.parametrize("array", [
    np.zeros((5, 4, 6), np.float32),           # not uint8
    np.zeros((5, 4, 6), np.int64),
    np.zeros((5, 24), np.uint8),               # too few dimensions
    np.zeros((5, 4, 6, 2), np.uint8),          # 2 channels
    np.zeros((5, 3, 4, 6), np.uint8),          # channels first (N, C, H, W): 6 "channels"
    np.zeros((2, 5, 4, 6, 3), np.uint8),       # too many dimensions
])
def test_image_arrays_of_wrong_type_or_shape(tmp_path, array):
    np.save(tmp_path / "imgs.npy", array)
    refused(datasets.read_images, tmp_path / "imgs.npy", "need a uint8 array", str(array.dtype),
            str(array.shape))


def test_image_labels(tmp_path):
    images = np.zeros((5, 4, 6), np.uint8)
    np.savez(tmp_path / "a.npz", x=images, y=LABELS - 1)
    refused(datasets.read_images, tmp_path / "a.npz", "whole numbers")
    np.savez(tmp_path / "b.npz", x=images, y=LABELS / 2)
    refused(datasets.read_images, tmp_path / "b.npz", "whole numbers")
    np.savez(tmp_path / "c.npz", x=images, y=LABELS[:4])
    refused(datasets.read_images, tmp_path / "c.npz", "4 labels for 5 samples")
    np.savez(tmp_path / "d.npz", images=images)
    refused(datasets.read_images, tmp_path / "d.npz", "array named x")


def test_images_missing_or_other_formats(tmp_path):
    refused(datasets.read_images, tmp_path / "missing.npy", "no such file", error=FileNotFoundError)
    refused(datasets.read_images, tmp_path / "missing.npz", "no such file", error=FileNotFoundError)
    refused(datasets.read_images, tmp_path / "no_folder", "no such file", error=FileNotFoundError)
    save(tmp_path / "one.png", grey(0))  # one image, not a folder of them
    refused(datasets.read_images, tmp_path / "one.png", "a folder or a .npy/.npz array")
