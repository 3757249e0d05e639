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


def run_in_kernel(workdir: Path, cells: list[str], outputs: list | None = None) -> list[dict]:
    """Run notebook cells one by one in a real IPython kernel started in `workdir`; returns each
    cell's reply content, and checks after the last one that the kernel still answers. `outputs`,
    when given, receives for each cell the list of its output messages' (msg_type, content)."""
    import os
    from jupyter_client.manager import start_new_kernel
    manager, client = start_new_kernel(kernel_name="python3", cwd=str(workdir),
                                       env={**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"})
    try:
        replies = []
        for cell in cells:
            seen = []
            replies.append(client.execute_interactive(
                cell, timeout=240, output_hook=lambda msg: seen.append((msg["msg_type"], msg["content"])))["content"])
            if outputs is not None:
                outputs.append(seen)
        assert client.execute_interactive("1 + 1", timeout=30, output_hook=lambda m: None)["content"]["status"] == "ok"
        return replies
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def train_on_sample(work: Path, settings: str, root: str = "mydata") -> Path:
    """Train in `work` with `settings` (an INI text saved as work/train.ini) on the bundled sample,
    linked as work/<root>/train; returns `work`."""
    import os
    import train
    (work / root).mkdir()
    (work / root / "train").symlink_to(SAMPLE)
    (work / "train.ini").write_text(settings)
    old = os.getcwd()
    os.chdir(work)
    try:
        train.main(["--config", "train.ini", "--quiet", "--no-resume"])
    finally:
        os.chdir(old)
    return work


@pytest.fixture
def cfg(tmp_path):
    """The default settings, ignoring any ./config.ini, with the sample cache in tmp_path."""
    from config import load_config
    return load_config(user_path=None).replace("dataset", cache_dir=str(tmp_path / "cache"))
