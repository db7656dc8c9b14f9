"""The training and validation transforms of PAPER.md section 2: scale jittering, random crop, flip, PCA colour shift,
mean subtraction, windowed decoding; argument checks; reproducibility."""

import numpy as np
import pytest
import tensorflow as tf
from test_data_fixtures import BytesSource, batches, encode, noise, ramp, repeated

from vgg_keras.data import parse_scale, train_dataset, val_dataset
from vgg_keras.data.images import decode_rgb, rescale
from vgg_keras.data.pipeline import element_seeds, eval_transform, stateless_seed, training_choices
from vgg_keras.data.stats import ColorStats

PLAIN = dict(flip=False, color_shift=False)  # the geometric transform alone
ZERO_MEAN = ColorStats(mean_rgb=(0.0, 0.0, 0.0), eigenvalues=(0.2175, 0.0188, 0.0045),
                       eigenvectors=((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140),
                                     (-0.5836, -0.6948, 0.4203)))


def choices(n, scale=(256, 512), stats=ZERO_MEAN, seed=0):
    """training_choices of n consecutive element seeds, as numpy arrays (S, position, mirror, colour offset)."""
    seeds = element_seeds(seed).take(n).map(
        lambda r: training_choices(stateless_seed(r), scale, stats)).batch(n)
    return [t.numpy() for t in next(iter(seeds))]


# Arguments ------------------------------------------------------------------------------------------------------------

def test_parse_scale():
    assert parse_scale("256") == (256, 256)
    assert parse_scale("256:512") == (256, 512)
    assert parse_scale(384) == (384, 384)


@pytest.mark.parametrize("text, message", [("abc", "--scale 'abc': expected S"), ("256:", "expected S"),
                                           ("1:2:3", "expected S"), ("0", "positive"),
                                           ("512:256", r"Smin \(512\) is larger than Smax \(256\)")])
def test_parse_scale_errors_name_the_flag_and_value(text, message):
    with pytest.raises(ValueError, match=message):
        parse_scale(text)


@pytest.mark.parametrize("kwargs, message", [
    (dict(scale=(512, 256)), "Smin"),
    (dict(scale=(256, 512), crop=300), "--crop 300 is larger than the smallest scale 256"),
    (dict(crop=0), "--crop 0"),
    (dict(batch_size=0), "--batch-size 0"),
    (dict(split="test"), "split 'test'"),
])
def test_train_dataset_argument_errors(kwargs, message):
    src = repeated(encode(noise(40, 40)), 2)
    args = dict(batch_size=2, scale=(32, 48), crop=32) | kwargs
    with pytest.raises(ValueError, match=message):
        train_dataset(src, **args)


def test_val_dataset_checks_q_against_crop():
    with pytest.raises(ValueError, match="--crop 64 is larger than the smallest scale 48 \\(--q\\)"):
        val_dataset(repeated(encode(noise(40, 40)), 2), 2, crop=64, q=48)


# Random choices -------------------------------------------------------------------------------------------------------

def test_smallest_side_is_uniform_over_the_whole_range():
    smallest, _, _, _ = choices(3000, scale=(32, 40))
    assert smallest.min() == 32 and smallest.max() == 40  # both ends drawn
    counts = np.bincount(smallest - 32, minlength=9)
    assert counts.min() > 3000 / 9 * 0.75  # every value, about equally often
    smallest, _, _, _ = choices(2000, scale=(256, 512))
    assert 256 <= smallest.min() < 262 and 506 < smallest.max() <= 512
    assert choices(50, scale=(300, 300))[0].tolist() == [300] * 50  # fixed S


def test_flip_probability_is_one_half():
    _, position, mirror, _ = choices(4000)
    assert 0.47 < mirror.mean() < 0.53
    assert 0 <= position.min() and position.max() < 1 and abs(position.mean() - 0.5) < 0.02


def test_color_shift_covariance_follows_the_eigen_decomposition():
    _, _, _, offsets = choices(6000)
    p, lam = np.array(ZERO_MEAN.eigenvectors), np.array(ZERO_MEAN.eigenvalues)
    expected = 255.0 ** 2 * 0.1 ** 2 * p @ np.diag(lam ** 2) @ p.T
    assert np.abs(offsets.mean(0)).max() < 0.05 * np.sqrt(expected[0, 0])
    assert np.linalg.norm(np.cov(offsets.T) - expected) < 0.08 * np.linalg.norm(expected)


# The transform, end to end --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])  # the windowed JPEG decode and the decode-all path
@pytest.mark.parametrize("size", [(96, 128), (128, 96)])
def test_rescaled_smallest_side_covers_smin_to_smax(fmt, size):
    """The crop of a ramp image shows the scale S it was rescaled to (slope = step * min side / S)."""
    options = {"quality": 98} if fmt == "JPEG" else {}
    pixels = ramp(*size) if size[1] > size[0] else np.transpose(ramp(*size[::-1]), (1, 0, 2))
    images, _ = batches(train_dataset(repeated(encode(pixels, fmt, **options), 300), 100, scale=(96, 192), crop=32,
                                      stats=ZERO_MEAN, seed=1, **PLAIN))
    axis = 2 if size[1] > size[0] else 1
    profile = images[..., 0].mean(axis=3 - axis)  # along the ramp
    slope = np.polyfit(np.arange(4, 28), profile[:, 4:28].T, 1)[0]
    estimated = 2 * 96 / slope
    assert 96 * 0.95 < estimated.min() < 96 + 10 and 192 - 10 < estimated.max() < 192 * 1.05


@pytest.mark.parametrize("size", [(3, 2), (1, 1), (6, 300), (300, 6), (150, 200)])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_crop_size_for_any_image_size(size, fmt):
    images, labels = batches(train_dataset(repeated(encode(noise(*size), fmt), 6, label=1), 4, scale=(40, 56),
                                           crop=40, seed=0))
    assert images.shape == (6, 40, 40, 3) and images.dtype == np.float32
    assert labels.tolist() == [1] * 6 and labels.dtype == np.int64


def test_small_images_are_upscaled_not_padded():
    colour = np.full((5, 4, 3), (90, 150, 210), np.uint8)
    images, _ = batches(train_dataset(repeated(encode(colour, "PNG"), 4), 4, scale=(64, 96), crop=64,
                                      stats=ZERO_MEAN, seed=0, **PLAIN))
    np.testing.assert_allclose(images.reshape(-1, 3), np.tile([90, 150, 210], (4 * 64 * 64, 1)), atol=1e-3)


def test_mean_subtraction_and_colour_shift_add_one_offset_per_image():
    stats = ColorStats(mean_rgb=(10.0, 20.0, 30.0), eigenvalues=ZERO_MEAN.eigenvalues,
                       eigenvectors=ZERO_MEAN.eigenvectors)
    src = repeated(encode(np.full((40, 50, 3), (200, 100, 50), np.uint8), "PNG"), 64)
    plain, _ = batches(train_dataset(src, 64, scale=(40, 48), crop=32, stats=stats, seed=5, **PLAIN))
    np.testing.assert_allclose(plain.reshape(-1, 3), np.tile([190, 80, 20], (64 * 32 * 32, 1)), atol=1e-3)
    shifted, _ = batches(train_dataset(src, 64, scale=(40, 48), crop=32, stats=stats, seed=5, flip=False))
    offsets = (shifted - plain).reshape(64, -1, 3)
    np.testing.assert_allclose(offsets, np.broadcast_to(offsets[:, :1], offsets.shape), atol=1e-3)  # per image
    assert np.abs(offsets[:, 0]).max() > 1.0  # shifted, differently per image
    assert len({tuple(np.round(o, 3)) for o in offsets[:, 0]}) == 64


def test_flips_about_half_the_crops():
    left_dark = np.concatenate([np.zeros((32, 16, 3)), np.full((32, 16, 3), 255)], 1)
    src = repeated(encode(left_dark, "PNG"), 400)
    for flip, low, high in ((True, 0.42, 0.58), (False, 0.0, 0.0)):
        images, _ = batches(train_dataset(src, 100, scale=(32, 32), crop=32, stats=ZERO_MEAN, seed=2, flip=flip,
                                          color_shift=False))
        flipped = images[:, :, :16].mean((1, 2, 3)) > images[:, :, 16:].mean((1, 2, 3))
        assert low <= flipped.mean() <= high


def test_same_seed_same_batches_other_seed_other_batches():
    src = BytesSource([(encode(noise(50, 70, seed=i)), i % 2, f"f{i}") for i in range(12)])

    def epochs(seed, count=2):
        dataset = train_dataset(src, 5, scale=(40, 64), crop=32, seed=seed)
        return [batches(dataset) for _ in range(count)]  # each pass is one epoch

    first, again, other = epochs(7), epochs(7), epochs(8)
    for (images, labels), (images2, labels2) in zip(first, again):
        np.testing.assert_array_equal(images, images2)
        np.testing.assert_array_equal(labels, labels2)
    assert not np.array_equal(first[0][0], other[0][0])
    assert not np.array_equal(first[0][0], first[1][0])  # a new epoch draws new crops and order


def smooth(height, width, seed):
    """A photo-like uint8 image [height, width, 3]: noise upsampled bicubically, so that a crop one pixel off differs
    from the right one by a little, as in a photograph."""
    small = noise(height // 4 + 1, width // 4 + 1, seed=seed).astype(np.float32)
    return tf.cast(tf.clip_by_value(tf.image.resize(small, [height, width], method="bicubic"), 0, 255),
                   tf.uint8).numpy()


@pytest.mark.parametrize("q, crop", [(256, 224), (64, 56), (96, 56)])  # JPEG windows decoded at 1/1, 1/4, 1/2 scale
def test_window_decode_matches_decoding_and_rescaling_everything(q, crop):
    """Our centre crop (window decoded alone, resized) against the slow way (decode all, antialiased rescale to Q,
    crop): closer than the slow way's own crop one pixel further (an integer window is up to half a pixel off).
    Photo-sized JPEGs of both orientations, as ImageNet's (375 x 500 is the median)."""
    for seed, (height, width) in enumerate([(375, 500), (500, 333), (281, 500), (400, 400)]):
        data = encode(smooth(height, width, seed), "JPEG", quality=95)
        rescaled = rescale(decode_rgb(data), q).numpy()
        top, left = (rescaled.shape[0] - crop) // 2, (rescaled.shape[1] - crop) // 2
        reference = rescaled[top:top + crop, left:left + crop]
        one_pixel_off = rescaled[top + 1:top + 1 + crop, left + 1:left + 1 + crop]
        ours = eval_transform(tf.constant(data), q, crop, ZERO_MEAN).numpy()
        assert np.abs(ours - reference).mean() < 0.8 * np.abs(one_pixel_off - reference).mean(), (height, width)


def test_val_dataset_centre_crops_every_image_in_order():
    """Smooth noise images of several shapes: each crop is the centre of the image rescaled to Q (computed here by
    rescaling the whole image), closer to it than the same crop one pixel off, so the position is checked."""
    pictures = [smooth(60 + 10 * i, 40 + 25 * (i % 3), seed=i) for i in range(5)]
    items = [(encode(picture, "PNG"), i % 2, f"f{i}") for i, picture in enumerate(pictures)]
    images, labels = batches(val_dataset(BytesSource(items), 2, crop=32, q=40, stats=ZERO_MEAN))
    assert images.shape == (5, 32, 32, 3) and labels.tolist() == [0, 1, 0, 1, 0]
    for picture, crop in zip(pictures, images):
        rescaled = rescale(tf.constant(picture, tf.float32), 40).numpy()
        top, left = (rescaled.shape[0] - 32) // 2, (rescaled.shape[1] - 32) // 2
        centre = rescaled[top:top + 32, left:left + 32]
        for dy, dx in ((1, 0), (0, 1), (-1, 0), (0, -1)):
            if 0 <= top + dy <= rescaled.shape[0] - 32 and 0 <= left + dx <= rescaled.shape[1] - 32:
                off = rescaled[top + dy:top + dy + 32, left + dx:left + dx + 32]
                assert np.abs(crop - centre).mean() < 0.7 * np.abs(off - centre).mean(), (picture.shape, dy, dx)


def smooth_photo(height, width, seed):
    """A photo-like uint8 image: random colours at 1/16 resolution, bilinearly enlarged (JPEG keeps it well)."""
    coarse = np.random.default_rng(seed).uniform(0, 255, (height // 16 + 2, width // 16 + 2, 3)).astype(np.float32)
    return tf.cast(tf.image.resize(coarse, [height, width]), tf.uint8).numpy()


@pytest.mark.parametrize("shape, scale, crop", [((300, 400), (64, 96), 48),   # windows decoded at 1/2 and 1/4 scale
                                               ((90, 70), (48, 64), 48),     # upscaled: full-scale windows
                                               ((240, 180), (60, 60), 32)])  # windows 3-4x the crop: 1/2, 1/1
def test_training_crops_match_the_specified_transform_for_a_seed(shape, scale, crop):
    """Each training crop of a fixed seed against the transform as specified, computed independently here from the
    seed's choices (S, position, mirror, colour offset): the whole image decoded and rescaled to S (antialiased),
    the crop sliced at the chosen offset, mirrored, shifted by the colour offset minus the mean. Closer than the
    same reference shifted by one pixel (the window decode is within resize rounding of it, not bit-equal), so a
    crop moved, a scale, flip or colour shift changed, or two images' choices swapped, fails; a faster decode or
    resize that keeps the transform passes."""
    stats = ColorStats(mean_rgb=(120.0, 110.0, 100.0), eigenvalues=(4.0, 1.0, 0.5),  # colour offsets of ~50
                       eigenvectors=ZERO_MEAN.eigenvectors)
    n = 12
    items = [(encode(smooth_photo(*shape, seed=i), quality=95), 0, f"f{i}") for i in range(n)]
    images, _ = batches(train_dataset(BytesSource(items), n, scale=scale, crop=crop, stats=stats, seed=5,
                                      shuffle=False))
    sides, positions, mirrors, offsets = choices(n, scale, stats, seed=5)
    assert 0 < mirrors.sum() < n and np.abs(offsets).max() > 20
    for i, (data, _, _) in enumerate(items):
        rescaled = rescale(decode_rgb(data), int(sides[i])).numpy()
        room = np.array(rescaled.shape[:2]) - crop
        top, left = np.minimum((positions[i] * (room + 1)).astype(int), room)

        def reference(top, left):
            window = rescaled[top:top + crop, left:left + crop]
            return (window[:, ::-1] if mirrors[i] else window) + offsets[i] - np.array(stats.mean_rgb)

        error = np.abs(images[i] - reference(top, left)).mean()
        shifted = reference(top + 1 if top < room[0] else top - 1, left + 1 if left < room[1] else left - 1)
        assert error < 0.8 * np.abs(shifted - reference(top, left)).mean(), (i, error)
        # JPEG decoding at a reduced DCT scale moves channel means by ~1; a colour offset lost or changed, by ~50
        assert np.abs((images[i] - reference(top, left)).mean((0, 1))).max() < 2.5, (i, offsets[i])
