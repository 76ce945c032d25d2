"""notebooks/walkthrough.ipynb runs top to bottom (on a tiny configuration) and is committed clean."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "walkthrough.ipynb"

# Injected after the notebook's "parameters" cell, as papermill would.
TINY = """
NUM_IMAGES = 40
IMAGE_SIZE = 32
MAX_EPOCHS = 1
MAX_TIME = "null"
MODEL_ARGS = [
    "--data.min_count", "1", "--data.batch_size", "8", "--data.eval_batch_size", "8",
    "--model.encoder.channels", "16", "--model.encoder.grid", "4",
    "--model.decoder.embed_dim", "16", "--model.decoder.attention_dim", "16",
    "--model.decoder.decoder_dim", "16",
]
BEAM_SIZE = 2
NUM_EXAMPLES = 2
USE_JAVA = False
"""


def _read():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_committed_without_outputs() -> None:
    nb = _read()
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"


@pytest.mark.slow
def test_notebook_runs_on_a_tiny_configuration(tmp_path, monkeypatch) -> None:
    nb = _read()
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(TINY.strip()))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's tempfile.mkdtemp lands here
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "CIDEr" in text  # the evaluation table was printed
    images = [o for o in outputs if o.output_type in ("display_data", "execute_result")
              and "image/png" in o.get("data", {})]
    assert len(images) >= 1 + 2  # the example image and one attention figure per example
    assert any(tmp_path.glob("captioner-walkthrough-*/run/checkpoints/best.ckpt"))
