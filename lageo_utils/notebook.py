"""Notebook display: every matplotlib ``Figure`` shows as a PNG (with alt text), never as ``<Figure size …>``.

The package builds figures as ``matplotlib.figure.Figure`` without pyplot, and nothing in a plain
kernel gives those an image representation. ``setup_notebook`` registers one with IPython's display
formatters, so a figure as a cell's value, ``display(fig)`` and a figure shown inside an ipywidgets
``Output`` all produce ``image/png`` in JupyterLab, in papermill's executed notebooks and in
nbconvert's HTML. ``steps.open_step`` calls it, so notebooks need no setup cell.
"""

from __future__ import annotations

import base64
import importlib
import io

from matplotlib.figure import Figure

KERNEL_NAME = "lageo"  # the kernelspec `make lab` installs and the notebooks name
# papermill runs notebooks on ipykernel's built-in kernel: the Python that runs papermill, with no
# kernelspec to install (the notebooks' `lageo` may be missing, e.g. in CI or a conda env)
PAPERMILL_KERNEL = "python3"
INLINE_BACKENDS = ("module://matplotlib_inline.backend_inline", "inline")


def setup_notebook() -> bool:
    """Register the PNG and plain-text representations of ``Figure`` in the running IPython kernel.

    Idempotent; returns False (and does nothing) outside IPython.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None:
        return False
    _configure_inline_backend_first()
    formatters = shell.display_formatter.formatters
    formatters["image/png"].for_type(Figure, figure_png)
    formatters["text/plain"].for_type(Figure, _pretty_figure)
    return True


def _configure_inline_backend_first() -> None:
    """Let matplotlib-inline register its own figure formatters now, not later over ours.

    In a Jupyter kernel the backend is matplotlib-inline, which installs its formatters (and
    removes any other ``Figure`` formatter) the first time its module is imported, i.e. the
    first time pyplot draws; importing it before registering keeps ours in place.
    """
    import matplotlib

    if matplotlib.get_backend(auto_select=False) in INLINE_BACKENDS:  # the backend named, not resolved
        importlib.import_module("matplotlib_inline.backend_inline")


def figure_alt_text(fig: Figure) -> str:
    """A one-line description: the figure's label if set, else its title, else its axes' titles."""
    if fig.get_label():
        return fig.get_label()
    suptitle = fig.get_suptitle()
    if suptitle:
        return suptitle
    titles = [title for ax in fig.axes for title in (ax.get_title("left"), ax.get_title(), ax.get_title("right"))
              if title]
    return "; ".join(titles) or f"figure with {len(fig.axes)} axes"


def figure_png(fig: Figure) -> tuple[str, dict]:
    """The figure as base64 PNG (the report's resolution) with ``alt`` metadata, for IPython's formatter."""
    from lageo_utils.figures import DPI

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii"), {"alt": figure_alt_text(fig)}


def _pretty_figure(fig: Figure, printer, _cycle: bool) -> None:
    printer.text(f"Figure: {figure_alt_text(fig)}")


# nbconvert's lab template drops an image's alt text (it writes "No description has been provided");
# this block puts the output's ``alt`` metadata on its <img>, the rest of the template unchanged
_ALT_TEMPLATE_NAME = "lageo_alt_text.html.j2"
_ALT_TEMPLATE = """{%- extends 'index.html.j2' -%}
{% block data_png scoped %}
{%- set alt = output | get_metadata('alt', 'image/png') -%}
{%- if alt -%}
{{ super() | replace('<img ', '<img alt="' ~ (alt | escape_html) ~ '" ', 1) }}
{%- else -%}
{{ super() }}
{%- endif -%}
{%- endblock data_png %}
"""


def html_exporter():
    """nbconvert's ``lab`` HTML exporter that keeps each PNG's alt text (from its output metadata)."""
    import jinja2
    from nbconvert import HTMLExporter

    return HTMLExporter(template_name="lab", template_file=_ALT_TEMPLATE_NAME,
                        extra_loaders=[jinja2.DictLoader({_ALT_TEMPLATE_NAME: _ALT_TEMPLATE})])
