"""notebooks/quickstart.ipynb runs top to bottom (nbclient, python3 kernel) as it says."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def _text(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def test_quickstart_notebook_runs(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "\n".join(_text(c) for c in notebook.cells if c.cell_type == "code")
    assert "trainable params:" in outputs
    start, end = (float(x) for x in outputs.split("loss ")[1].split("\n")[0].split(" -> "))
    assert end < 0.5 * start
    assert "adapter_config.json" in outputs and "adapter_model.safetensors" in outputs
    assert "loaded == trained: True" in outputs and "merged == unmerged: True" in outputs
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in notebook.cells for o in c.get("outputs", []))  # the loss plot
