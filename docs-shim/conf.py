"""Minimal Sphinx configuration that builds this pull request's docs page and API reference.

Upstream TransformerLens builds its docs from ``docs/source`` with its own configuration; this
shim lives outside that tree so the page (``docs/source/content/logit_lens.md``) is shipped
unchanged. ``make docs`` copies the page under ``content/`` beside this file's ``index.md`` and
``api.md``, mirroring upstream's layout, and builds with warnings as errors.
"""

project = "TransformerLens: logit lens and direct logit attribution"
author = "TransformerLens contributors"

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
root_doc = "index"

napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"

html_theme = "alabaster"
