"""notebooks/inspect_store.ipynb: committed without outputs, and runs top to bottom on a real store."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from vlastore.cli import main as cli_main
from vlastore.demo import make_demo_store
from vlastore.format import Producer
from vlastore.store import VLAStore

nbformat = pytest.importorskip("nbformat", reason="pip install vlastore[notebook]")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "inspect_store.ipynb"
KERNEL = "vlastore-test-python"

# appended to the executed copy only: what the notebook computed, and which python ran it
PROBE = """import json, sys
print("PROBE" + json.dumps({
    "executable": sys.executable,
    "store": store.location,
    "summary": summary[["episodes", "steps", "bytes_on_disk", "files"]].astype(int).to_dict(),
    "manifest": manifest[["rows", "rows_present", "dtype", "row_shape", "bytes_on_disk", "files", "payload_bytes",
                          "shards_written", "current_generation", "generations"]].to_dict(orient="index"),
    "coverage": by_family.astype(int).to_dict(orient="index"),
    "episode_steps": int(episodes["steps"].sum()),
    "stats_rows": {s["family"]: s["rows_present"] for s in stats},
    "drifting": drifting,
    "drift_rows": len(drift),
}))"""


def test_committed_notebook_has_no_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for i, cell in enumerate(code):
        assert cell.outputs == [], f"code cell {i} has outputs; strip them before committing"
        assert cell.execution_count is None, f"code cell {i} has an execution count; strip it before committing"
    assert any("parameters" in c.metadata.get("tags", []) for c in code), "no cell tagged 'parameters'"


def _store_with_two_generations(path: Path) -> VLAStore:
    """The demo store, small, plus a second generation of qwen_vl that misses two rows."""
    import torch

    store = make_demo_store(path, episodes=4, hidden=64, token_hidden=16)
    store = VLAStore.open(path, writable=True)
    old = store.reader("qwen_vl")
    rows = np.arange(store.layout("qwen_vl").rows)
    kept = rows[2:]  # rows 0 and 1 are never rebuilt: they drop out of coverage and of the drift
    info = store.new_generation("qwen_vl", Producer("demo/random-features", "v1", fingerprint="demo0001"))
    with store.writer("qwen_vl", generation=info.generation) as writer:
        values = torch.stack([old.tensor(int(r)).float() for r in kept])
        writer.write_rows(kept, (values * 1.1 + 0.05).to(torch.bfloat16))
    store.switch_generation("qwen_vl", info.generation, keep_previous=None)
    return VLAStore.open(path)


def _kernel_manager(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A kernel that runs this interpreter, whatever kernelspecs the machine has."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "vlastore test",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def test_notebook_runs_and_agrees_with_vlastore_info(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("nbclient", reason="pip install vlastore[notebook]")
    pytest.importorskip("ipykernel", reason="pip install vlastore[notebook]")
    pytest.importorskip("matplotlib", reason="pip install vlastore[notebook]")
    from nbclient import NotebookClient

    path = tmp_path / "store.vla"
    _store_with_two_generations(path)
    monkeypatch.setenv("VLASTORE_STORE", str(path))
    # the kernel imports this checkout's vlastore, installed or not
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend makes the images
    workdir = tmp_path / "notebooks"  # a fresh folder: the notebook must not make a demo store here
    workdir.mkdir()

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    client = NotebookClient(
        nb, km=_kernel_manager(tmp_path), timeout=120, resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()  # raises CellExecutionError naming the cell on any error

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images >= 5, f"expected coverage, statistics, projection, curves and drift plots; got {images} images"
    assert list(workdir.iterdir()) == [], "the notebook wrote into its working folder"

    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    probe = json.loads(text.split("PROBE", 1)[1])
    assert Path(probe["executable"]).resolve() == Path(sys.executable).resolve()
    assert probe["store"] == str(path)

    assert cli_main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert probe["summary"] == {k: info[k] for k in ("episodes", "steps", "bytes_on_disk", "files")}
    assert probe["episode_steps"] == info["steps"]
    assert set(probe["manifest"]) == set(info["families"])
    for family, row in probe["manifest"].items():
        assert row == {k: info["families"][family][k] for k in row}, family
        assert probe["coverage"][family]["rows"] == info["families"][family]["rows"]
        assert probe["coverage"][family]["present"] == info["families"][family]["rows_present"]
        assert probe["stats_rows"][family] == info["families"][family]["rows_present"]
    assert info["families"]["qwen_vl"]["generations"] == [1, 2]
    assert info["families"]["qwen_vl"]["rows_present"] == info["families"]["qwen_vl"]["rows"] - 2
    assert probe["drifting"] == ["qwen_vl"]
    assert probe["drift_rows"] == info["families"]["qwen_vl"]["rows"] - 2
