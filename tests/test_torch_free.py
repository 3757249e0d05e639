"""split.py, crop.py, preview.py and the dataset readers run without importing torch (it takes
seconds to import); NucleiDataset and make_sampler still come from `dataset` when asked for."""
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, disk, make_sample

CHECK = "import sys; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"


def run_python(code, cwd):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("module", ["split", "crop", "preview", "dataset", "dataset.io", "dataset.selection",
                                    "dataset.augment", "dataset.targets", "dataset.tiles", "atomic"])
def test_importing_does_not_import_torch(module, tmp_path):
    result = run_python(f"import {module}; {CHECK}", tmp_path)
    assert result.returncode == 0, result.stderr


def test_preview_draws_its_picture_without_torch(tmp_path):
    for i in range(3):
        make_sample(tmp_path / "data", f"s{i}", np.full((48, 48, 3), 60 * i, np.uint8),
                    [disk((48, 48), (12, 12), 6), disk((48, 48), (30, 34), 8)])
    (tmp_path / "small.ini").write_text("[pre]\nwidth = 32\n")
    code = ("import sys, preview; preview.main(['data', '--out', 'pic', '--n', '2', '--config', 'small.ini']); "
            + CHECK)
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "3 images" in result.stdout and "wrote pic/preview.png" in result.stdout
    assert (tmp_path / "pic" / "preview.png").stat().st_size > 1000


def test_the_torch_parts_load_on_first_access():
    import dataset
    from dataset import torch_data
    assert dataset.NucleiDataset is torch_data.NucleiDataset and dataset.make_sampler is torch_data.make_sampler
    with pytest.raises(AttributeError, match="no attribute 'NucleiDatset'"):
        dataset.NucleiDatset  # noqa: B018 (a misspelt name is still an AttributeError)
