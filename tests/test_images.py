"""Every image a user gives us is read upright and with the right pixel values (ether_diffusion/images.py)."""

import io
import os
import threading

import numpy as np
import pytest
from conftest import png_header
from PIL import Image

from ether_diffusion.images import ImageReadError, check_image, open_image
from ether_diffusion.studio.uploads import save_uploads
from ether_diffusion.training.data import load_image_folder


def test_16_bit_greyscale_is_scaled_not_clipped_to_white(tmp_path):
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")  # what Pillow hands back for a 16-bit PNG
    pixels = np.asarray(open_image(path), dtype=np.int32)
    assert pixels.shape == (64, 64, 3) and (pixels[..., 0] == pixels[..., 2]).all()
    expected = np.round(ramp.astype(np.float64) / 65535 * 255)
    assert np.abs(pixels[..., 0] - expected).max() <= 1
    assert pixels.min() == 0 and pixels.max() == 255 and len(np.unique(pixels)) > 200  # a ramp, not all white


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)  # stored landscape: left half red
    stored[:, :20] = (255, 0, 0)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display", as phones write it
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif, quality=95)
    upright = np.asarray(open_image(path), dtype=np.int32)
    assert upright.shape == (40, 20, 3)  # portrait, as it is shown
    assert upright[:20, :, 0].mean() > 200 and upright[20:, :, 0].mean() < 50  # red on top after the turn


def test_transparency_goes_on_white_and_palettes_keep_their_colours(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert (np.asarray(open_image(tmp_path / "clear.png")) == 255).all()
    palette = Image.new("P", (4, 4))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((0, 0), 1)
    palette.save(tmp_path / "classes.png")
    pixels = np.asarray(open_image(tmp_path / "classes.png"))
    assert tuple(pixels[0, 0]) == (200, 100, 50) and tuple(pixels[1, 1]) == (10, 20, 30)


def test_training_and_upload_readers_share_it(tmp_path):
    ramp = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    folder = tmp_path / "instance"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(ramp).save(folder / f"{i}.png")
    for image in load_image_folder(folder):
        assert np.asarray(image).max() == 255 and np.asarray(image).min() == 0
    written = save_uploads(sorted(folder.iterdir()), tmp_path / "saved")
    assert np.asarray(Image.open(written[0])).mean() == pytest.approx(127.5, abs=2)


def test_unreadable_files_name_themselves(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(ImageReadError, match=r"notes.png: not an image"):
        open_image(tmp_path / "notes.png")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # the header is intact, the pixels are not
    with pytest.raises(ImageReadError, match=r"cut.png: cannot be read as an image"):
        open_image(tmp_path / "cut.png")


def test_sizes_over_the_limit_are_refused_from_the_header_with_one_message(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header(20000, 20000))  # over PIL's own bomb limit too
    with pytest.raises(ImageReadError, match=r"^bomb.png: 400,000,000 pixels is too large \(at most 67,108,864"):
        open_image(tmp_path / "bomb.png")
    Image.new("1", (10000, 7000)).save(tmp_path / "wide.png")  # 70 Mpx: a 9 KB file, over our limit only
    with pytest.raises(ImageReadError, match=r"^wide.png: 10000×7000 pixels is too large"):
        check_image(tmp_path / "wide.png")
    # a dataset row's bytes, named by the caller
    with pytest.raises(ImageReadError, match=r"^row 3 of --image_column 'image': 400,000,000 pixels is too large"):
        open_image(io.BytesIO(png_header(20000, 20000)), name="row 3 of --image_column 'image'")
    assert check_image(io.BytesIO(png_header(64, 32))) == (64, 32)


def test_folders_and_fifos_named_like_images_are_refused_unread(tmp_path):
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ImageReadError, match=r"^folder.png: a folder, not an image file"):
        open_image(tmp_path / "folder.png")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    # a writer that opens and closes the FIFO after a while, so that a reader that opened it ends instead of hanging
    writer = threading.Timer(2.0, lambda: os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)))
    writer.start()
    try:
        with pytest.raises(ImageReadError, match=r"^pipe.png: not a regular file"):
            open_image(fifo)
    finally:
        writer.cancel()
