"""Sphinx configuration of xent's documentation: MyST Markdown pages, numpydoc API pages.

Build: ``nox -s docs`` (warnings are errors), or ``sphinx-build -W -b html docs docs/_build/html``
with xent and the ``docs`` extra installed.
"""

from __future__ import annotations

import xent

project = "xent"
author = "xent developers"
copyright = "2026, xent developers"
release = version = xent.__version__

extensions = [
    "myst_parser",
    "numpydoc",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]

myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]

autosummary_generate = True
autodoc_typehints = "none"  # numpydoc's Parameters sections give the types in words
numpydoc_show_class_members = False
numpydoc_xref_param_type = False

html_theme = "furo"
html_title = f"xent {version}"
