"""The Colab notebooks (notebooks/*.ipynb) run top to bottom and stay clean.

Each notebook is executed in a fresh Jupyter kernel (nbclient) in smoke mode
(ODIN_JAX_NOTEBOOK_SMOKE=1: the `:test` presets, a few steps), writing its
runs under one temporary directory shared by the three (as a user's
ODIN_JAX_NOTEBOOK_DIR is: 03 then loads 01's checkpoint instead of training
its own, and trains one when run alone); any cell error fails the test with
the cell's traceback. The kernel is a subprocess: it gets the CPU platform, one
device (the notebooks train on "every local device"; one keeps the steps
free of XLA:CPU collectives) and the test run's XLA compile cache.

The committed .ipynb files must carry no outputs or execution counts, so
that diffs show code and prose only.
"""

import json
import os
import pathlib
import re

import nbformat
from nbclient import NotebookClient
import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ("01_detcon_quickstart", "02_odin_object_discovery",
            "03_use_a_pretrained_backbone")
# Per notebook, generous for a cold compile cache on a loaded 2-core machine.
CELL_TIMEOUT_S = 900


def test_notebooks_present():
  # Guards the parametrised tests below against a glob that finds nothing.
  assert tuple(p.stem for p in NOTEBOOKS) == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
  raw = json.loads(path.read_text(encoding="utf-8"))   # what git stores
  nbformat.validate(nbformat.from_dict(raw))
  dirty = [i for i, cell in enumerate(raw["cells"])
           if cell["cell_type"] == "code" and (
               cell.get("outputs") or cell.get("execution_count") is not None
               or "execution" in cell.get("metadata", {}))]
  assert not dirty, (
      f"{path.name}: code cells {dirty} carry outputs or execution counts; "
      "clear them before committing (Jupyter: Edit > Clear All Outputs, or "
      f"jupyter nbconvert --clear-output --inplace {path}).")
  first_code = next(c for c in raw["cells"] if c["cell_type"] == "code")
  assert "google.colab" in "".join(first_code["source"]), (
      "the first code cell must install odin_jax when run in Colab")
  badge = "".join(raw["cells"][0]["source"])
  assert f"notebooks/{path.name}" in badge and "colab-badge" in badge


def _kernel_env(workdir: pathlib.Path) -> dict:
  env = dict(os.environ)
  # conftest.py simulates 4 devices for the in-process tests; the kernel
  # gets one.
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+",
                            "", env.get("XLA_FLAGS", "")).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env["ODIN_JAX_NOTEBOOK_SMOKE"] = "1"
  env["ODIN_JAX_NOTEBOOK_DIR"] = str(workdir)
  env.pop("ODIN_JAX_PRETRAINED_WORKDIR", None)
  return env


@pytest.fixture(scope="module")
def notebook_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("notebooks")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, notebook_dir):
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(
      nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
      resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
  client.execute(env=_kernel_env(notebook_dir))   # raises CellExecutionError
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count for c in code)
  figures = sum("image/png" in o.get("data", {}) for c in code
                for o in c.outputs)
  assert figures >= 2, f"{path.name} drew {figures} figures"
  assert list(notebook_dir.glob("*/checkpoints/*")), "no checkpoint written"
