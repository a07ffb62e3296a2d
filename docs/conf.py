"""Sphinx configuration of trioserve's documentation site (``nox -s docs`` builds it).

Pages are Markdown (MyST), so they read on GitHub as they do on the site. Two local
extensions (``_ext/``) write what must not drift: the option reference from the parser
``trioserve --help`` prints, and the performance tables from bench/results.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # trioserve itself, from this checkout
sys.path.insert(0, str(HERE / "_ext"))

import trioserve  # noqa: E402

project = "trioserve"
author = "the trioserve authors"
copyright = "the trioserve authors"
release = trioserve.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "trioserve_docs",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"

# Every internal reference must resolve (sphinx-build -n). There is no network at build
# time, so no intersphinx: names from trio, the standard library and typing are left
# unlinked on purpose, and only they.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(trio|ssl|socket|logging|os|mmap|collections\.abc|typing|types)\..*"),
    (r"py:.*", r"(Stream|HalfCloseableStream|SendStream|ReceiveStream|AsyncResource)(\..*)?"),
    (r"py:class", r".*\[.*"),  # a generic type in an annotation, e.g. tuple[str, ...]
    # Private types that appear in public signatures (the test server's context).
    (r"py:class", r"trioserve\.context\.ServerContext"),
    (r"py:class", r"trioserve\.testing\._pipe\._Pipe"),
]

# Quotes and ellipses only: "--threads" must not become an en dash.
smartquotes_action = "qe"

myst_heading_anchors = 3
myst_enable_extensions = ["deflist"]

autodoc_member_order = "bysource"
autodoc_inherit_docstrings = False  # trio's own docstrings are not ours to publish
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = [
    ("Resource handling", "params_style"),
    ("Error handling", "params_style"),
]

html_theme = "furo"
html_title = f"trioserve {release}"
html_static_path = ["_static"]
html_css_files = ["trioserve.css"]
