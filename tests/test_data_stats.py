"""`vgg-keras stats`: mean RGB and the RGB covariance's eigen-decomposition, over every pixel of the training images."""

import numpy as np
import pytest
from test_data_fixtures import encode, fresh_skipped, write_files  # noqa: F401

from vgg_keras import cli
from vgg_keras.data import ColorStats, compute_stats, load_source


def correlated_pixels(height, width, seed):
    """Colours with a known, strongly correlated covariance (like natural images: R, G, B move together)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(120, 50, (height, width, 1))
    return np.clip(base + rng.normal(0, [5, 15, 30], (height, width, 3)), 0, 255).astype(np.uint8)


@pytest.fixture
def folder(tmp_path):
    """Lossless PNGs of varied sizes in two classes, and a file that cannot be decoded; returns (root, pixels)."""
    images = {f"{'ab'[i % 2]}/img{i}.png": correlated_pixels(20 + 3 * i, 30 - i, seed=i) for i in range(6)}
    root = write_files(tmp_path, {name: encode(pixels, "PNG") for name, pixels in images.items()}
                       | {"a/broken.png": b"\x89PNG\r\n\x1a\n broken"})
    return root, np.concatenate([p.reshape(-1, 3) for p in images.values()]).astype(np.float64)


def test_mean_and_covariance_of_all_pixels(folder):
    root, pixels = folder
    stats = compute_stats(load_source(root, val_fraction=0.0))
    np.testing.assert_allclose(stats.mean_rgb, pixels.mean(0), atol=1e-3)
    covariance = np.cov((pixels / 255.0).T, bias=True)  # eigenvalues in [0, 1] units, as IMAGENET_STATS
    p, lam = np.array(stats.eigenvectors), np.array(stats.eigenvalues)
    np.testing.assert_allclose(p @ np.diag(lam) @ p.T, covariance, atol=1e-6)
    np.testing.assert_allclose(p.T @ p, np.eye(3), atol=1e-6)  # orthonormal columns
    np.testing.assert_allclose(lam, np.linalg.eigvalsh(covariance)[::-1], rtol=1e-5)  # largest first
    assert "6 images" in stats.source


def test_max_images_samples_some(folder):
    root, _ = folder
    stats = compute_stats(load_source(root, val_fraction=0.0), max_images=3, seed=1)
    assert "3 images" in stats.source
    with pytest.raises(ValueError, match="--max-images 0"):
        compute_stats(load_source(root, val_fraction=0.0), max_images=0)


def test_stats_command_writes_what_training_reads(folder, tmp_path, capsys):
    root, pixels = folder
    out = tmp_path / "stats.json"
    assert not cli.main(["stats", "--data", str(root), "--val-fraction", "0", "--out", str(out)])
    stats = ColorStats.from_json(out)
    np.testing.assert_allclose(stats.mean_rgb, pixels.mean(0), atol=1e-3)
    assert f"{out}: mean RGB" in capsys.readouterr().out


def test_no_decodable_image(tmp_path):
    root = write_files(tmp_path, {"a/x.jpg": b"", "b/y.jpg": b"no"})
    with pytest.raises(ValueError, match="no decodable image in the train split"):
        compute_stats(load_source(root, val_fraction=0.0))
