"""notebooks/quickstart.ipynb runs in a real Jupyter kernel: split, train, predict with inline figures."""
import json
import re

from conftest import REPO, run_in_kernel

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def code_cells() -> list[str]:
    notebook = json.loads(NOTEBOOK.read_text())
    assert notebook["nbformat"] == 4
    return ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]


def text_of(messages) -> str:
    return "".join(c.get("text", "") for kind, c in messages if kind == "stream")


def test_quickstart_notebook_runs_in_a_kernel(tmp_path, monkeypatch):
    """The notebook's own cells, unchanged, in a kernel started in notebooks/ as Jupyter starts it;
    everything it writes lands in QUICKSTART_WORK, nothing in the repository."""
    before = sorted(p.name for p in (REPO / "notebooks").iterdir())
    work = tmp_path / "work"
    monkeypatch.setenv("QUICKSTART_WORK", str(work))
    monkeypatch.setenv("QUICKSTART_EPOCHS", "2")  # the pipeline, not the score, is under test
    cells = code_cells()
    assert any(c.lstrip().startswith("%run") and "train.py" in c for c in cells)
    outputs = []
    replies = run_in_kernel(REPO / "notebooks", cells, outputs)
    assert [r["status"] for r in replies] == ["ok"] * len(cells), [(r.get("ename"), r.get("evalue")) for r in replies]
    text = "".join(text_of(o) for o in outputs)
    assert f"work folder: {work}" in text
    # split: six training and two validation images
    assert (work / "out/demo/data/train").is_dir() and len(list((work / "out/demo/data/valid").iterdir())) == 2
    # training: one line per epoch, then the checkpoints under the work folder
    train_text = text_of(outputs[2])
    assert re.findall(r"^Epoch: \[(\d+)\]", train_text, flags=re.M) == ["1", "2"], train_text
    assert re.search(r"valid DSB score: \d\.\d{3}", train_text), train_text
    assert (work / "out/demo/checkpoint/best.pkl").is_file()
    # prediction: a DSB score, and the figures inline as PNG displays
    valid_text = text_of(outputs[3])
    assert re.search(r"mean:? dsb \d\.\d{4}", valid_text, flags=re.I), valid_text
    pngs = [c for kind, c in outputs[3] if kind == "display_data" and "image/png" in c["data"]]
    assert len(pngs) == 2
    assert not (REPO / "notebooks" / "out").exists()
    assert sorted(p.name for p in (REPO / "notebooks").iterdir()) == before
