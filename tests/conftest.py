"""Shared fixtures: tiny synthetic DSB2018-layout folders and the bundled real sample."""
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample" / "stage1_train"


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(".png", array)
    assert ok
    path.write_bytes(data.tobytes())
    return path


def disk(shape, centre, radius) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def make_sample(root: Path, sample_id: str, image: np.ndarray, masks: list[np.ndarray] | None) -> Path:
    """Write one sample folder; image is written as given (cv2 channel order), masks as 0/255."""
    folder = root / sample_id
    write_png(folder / "images" / f"{sample_id}.png", image)
    for i, mask in enumerate(masks or []):
        write_png(folder / "masks" / f"m{i:03d}.png", mask.astype(np.uint8) * 255)
    return folder


@pytest.fixture
def cfg(tmp_path):
    """The default settings, ignoring any ./config.ini, with the sample cache in tmp_path."""
    from config import load_config
    return load_config(user_path=None).replace("dataset", cache_dir=str(tmp_path / "cache"))
