"""Figures display as PNG with alt text in IPython once ``setup_notebook`` ran (``steps.open_step`` runs it)."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys

import pytest
from bs4 import BeautifulSoup
from conftest import PROJECT_ROOT
from matplotlib.figure import Figure
from PIL import Image

from lageo_utils.notebook import figure_alt_text, setup_notebook


@pytest.fixture
def shell():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    yield shell
    for mime in ("image/png", "text/plain"):
        shell.display_formatter.formatters[mime].pop(Figure, None)


def _figure(title: str = "Two panels") -> Figure:
    fig = Figure(figsize=(4, 2))
    left, right = fig.subplots(1, 2)
    left.plot([0, 1], [1, 0])
    left.set_title("left panel")
    right.set_title("right panel")
    fig.suptitle(title)
    return fig


def test_without_setup_a_figure_is_only_text(shell):
    data, _ = shell.display_formatter.format(_figure())
    assert "image/png" not in data and data["text/plain"].startswith("<Figure size")  # what the issue saw


def test_setup_gives_figures_a_png_with_alt_text(shell):
    assert setup_notebook() is True
    assert setup_notebook() is True  # idempotent: open_step runs in every notebook
    data, metadata = shell.display_formatter.format(_figure())
    png = Image.open(io.BytesIO(base64.b64decode(data["image/png"])))
    assert png.format == "PNG" and png.width > 400  # 4 in at the report's 120 dpi, tight box
    assert metadata["image/png"] == {"alt": "Two panels"}
    assert data["text/plain"] == "Figure: Two panels"


def test_display_of_a_figure_publishes_a_png(shell):
    from IPython.display import display
    from IPython.utils.capture import capture_output

    setup_notebook()
    with capture_output() as captured:
        display(_figure("shown with display()"))
    [output] = captured.outputs
    assert "image/png" in output.data and output.metadata["image/png"]["alt"] == "shown with display()"


def test_alt_text_prefers_label_then_suptitle_then_axes_titles():
    fig = _figure()
    assert figure_alt_text(fig) == "Two panels"
    fig.set_label("an explicit description")
    assert figure_alt_text(fig) == "an explicit description"
    untitled = _figure("")
    assert figure_alt_text(untitled) == "left panel; right panel"
    assert figure_alt_text(Figure()) == "figure with 0 axes"


def test_outside_ipython_setup_does_nothing():
    code = "from lageo_utils.notebook import setup_notebook; print(setup_notebook())"
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            check=True, timeout=120)
    assert result.stdout.strip() == "False"


def test_png_survives_the_inline_backend_loading_later():
    """In a Jupyter kernel the backend is matplotlib-inline; pyplot loading it must not undo the setup."""
    code = """
import json
from IPython.core.interactiveshell import InteractiveShell
from matplotlib.figure import Figure
from lageo_utils.notebook import setup_notebook
shell = InteractiveShell.instance()
setup_notebook()
import matplotlib.pyplot as plt
plt.figure()  # loads the backend, as any pyplot user (seaborn, contextily) may
fig = Figure()
fig.suptitle("after pyplot")
data, metadata = shell.display_formatter.format(fig)
print(json.dumps({"backend": plt.get_backend(), "text": data["text/plain"], "metadata": metadata}))
"""
    env = {**os.environ, "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True,
                            text=True, check=True, timeout=120)
    shown = json.loads(result.stdout.strip().splitlines()[-1])
    assert "matplotlib_inline" in shown["backend"]
    assert shown["text"] == "Figure: after pyplot"
    assert shown["metadata"] == {"image/png": {"alt": "after pyplot"}}


def test_notebooks_name_the_kernel_make_lab_installs():
    from lageo_utils.notebook import KERNEL_NAME

    notebooks = sorted((PROJECT_ROOT / "notebooks").glob("*.ipynb"))
    assert len(notebooks) == 6  # 01..06
    for path in notebooks:
        assert json.loads(path.read_text())["metadata"]["kernelspec"]["name"] == KERNEL_NAME, path.name
    assert f"ipykernel install --sys-prefix --name {KERNEL_NAME} " in (PROJECT_ROOT / "Makefile").read_text()


def test_html_export_keeps_the_alt_text(shell):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook, new_output

    from lageo_utils.notebook import html_exporter

    setup_notebook()
    data, metadata = shell.display_formatter.format(_figure('Errors <5 km & "far"'))
    plain = new_output("display_data", data={"image/png": data["image/png"]})  # e.g. pyplot's inline PNG
    notebook = new_notebook(cells=[new_code_cell("fig", outputs=[new_output("display_data", data=data,
                                                                              metadata=metadata), plain])])
    nbformat.validate(notebook)
    html, _ = html_exporter().from_notebook_node(notebook)
    alts = [img.get("alt") for img in BeautifulSoup(html, "html.parser").find_all("img")]
    assert alts == ['Errors <5 km & "far"', "No description has been provided for this image"]  # nbconvert's
