"""Sphinx configuration for pyro-invres.

Build (warnings are errors, as in CI)::

    sphinx-build -W -b html docs docs/_build/html

The API reference documents every object once, in the module that defines it. Two small
helpers below keep that correct while the package changes:

* ``.. invres-module:: pyro_invres.x`` is ``automodule`` with a guard: a module listed in
  :data:`OPTIONAL_MODULES` that fails to import gets a note on its page instead of a
  build failure (set ``PYRO_INVRES_DOCS_STRICT=1`` to make that a warning too).
* ``.. invres-exports:: pyro_invres.x`` tables the names in a package's ``__all__``, each
  linked to where it is defined; references written against the re-exported path
  (``:func:`~pyro_invres.iresnet```) resolve to that same place.

A module file under ``pyro_invres/`` that no API page documents is reported as a warning,
so a new module cannot land without a place in the reference.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import sys
import traceback
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# -- project -------------------------------------------------------------------------------
project = "pyro-invres"
author = "the pyro-invres authors"
copyright = "the pyro-invres authors"
try:
    from pyro_invres import __version__ as release
except Exception:  # noqa: BLE001 - the API pages report the import error themselves
    release = "unknown"
version = release

# -- general -------------------------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
nitpicky = False
default_role = "code"  # a single-backticked name in a docstring renders as code

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# -- autodoc and napoleon --------------------------------------------------------------------
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_member_order = "bysource"
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
    "member-order": "bysource",
    # forward/extra_repr are torch plumbing; the class docstrings describe the maps
    "exclude-members": "forward, extra_repr",
}
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True
autodoc_mock_imports: list[str] = []  # torch and pyro are real dependencies: import them
autosummary_generate = False  # tables only; every page is written by hand

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_include_init_with_doc = False
napoleon_use_rtype = False

# -- HTML ----------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"pyro-invres {release}"
html_static_path = ["_static"]
html_theme_options = {"navigation_with_keys": True}

# -- the package's layout ---------------------------------------------------------------------
#: Modules still being written: if one fails to import, its page says so instead of the
#: build failing. Every other module must import, or the build fails.
OPTIONAL_MODULES = {
    "pyro_invres.cli",
    "pyro_invres.datasets",
    "pyro_invres.nn.conditioners",
    "pyro_invres.ops.forward_gradient",
    "pyro_invres.train",
    "pyro_invres.transforms.coupling",
    "pyro_invres.transforms.inverse",
    "pyro_invres.transforms.revnet",
    "pyro_invres.transforms.subset",
}
STRICT = os.environ.get("PYRO_INVRES_DOCS_STRICT", "") not in ("", "0")

logger = logging.getLogger("pyro_invres.docs")


def _import_error(modname: str) -> str | None:
    """None if ``modname`` imports, else the last line of the exception."""
    try:
        importlib.import_module(modname)
    except Exception:  # noqa: BLE001 - any failure is reported, none is swallowed silently
        return traceback.format_exc().strip().splitlines()[-1]
    return None


def _parse(directive: SphinxDirective, text: str) -> list[nodes.Node]:
    return directive.parse_text_to_nodes(text, allow_section_headings=False)


class InvresModule(SphinxDirective):
    """``automodule`` (with the configured default options), guarded for optional modules."""

    required_arguments = 1
    has_content = False
    option_spec = {"no-members": directives.flag}

    def run(self) -> list[nodes.Node]:
        modname = self.arguments[0]
        error = _import_error(modname)
        if error is None:
            options = "   :no-members:\n" if "no-members" in self.options else ""
            return _parse(self, f".. automodule:: {modname}\n{options}")
        message = f"{modname} could not be imported, so it is not documented here: {error}"
        if modname not in OPTIONAL_MODULES or STRICT:
            logger.warning(message, location=self.get_location())
        else:
            print(f"pyro_invres docs: {message}", file=sys.stderr)
        note = nodes.note()
        note += nodes.paragraph(text=f"This build could not import {modname} ({error}).")
        return [note]


def _canonical(obj: object) -> str | None:
    if inspect.ismodule(obj):
        return obj.__name__
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if module and qualname and module.startswith("pyro_invres"):
        return f"{module}.{qualname}"
    return None


class InvresExports(SphinxDirective):
    """An autosummary table of ``module.__all__``, each entry under its defining module."""

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        module = importlib.import_module(self.arguments[0])
        names = []
        for name in getattr(module, "__all__", []):
            target = _canonical(getattr(module, name, None))
            if target is not None:
                names.append(f"   ~{target}")
        if not names:
            return []
        text = ".. autosummary::\n   :nosignatures:\n\n" + "\n".join(names) + "\n"
        # full dotted names: no current module for the table, restored afterwards
        saved = self.env.ref_context.pop("py:module", None)
        try:
            return _parse(self, text)
        finally:
            if saved is not None:
                self.env.ref_context["py:module"] = saved


def _lookup(path: str) -> object | None:
    """The object named by a dotted path, importing the longest module prefix."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except Exception:  # noqa: BLE001
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _candidates(target: str, node) -> list[str]:  # noqa: ANN001
    """Dotted paths ``target`` may mean: as written, or relative to the current module."""
    if target.startswith("pyro_invres"):
        return [target]
    module = node.get("py:module") or ""
    found = []
    while module.startswith("pyro_invres"):
        found.append(f"{module}.{target}")
        module = module.rpartition(".")[0]
    return found


def _resolve_reexport(app, env, node, contnode):  # noqa: ANN001, ANN202
    """Resolve a reference that names an object where it is re-exported, not defined.

    ``pyro_invres.iresnet`` becomes ``pyro_invres.transforms.iresnet.iresnet``. A short
    name without a module context (a summary line in an exports table) resolves when
    exactly one object of the package has that name.
    """
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "").lstrip(".~")
    domain = env.get_domain("py")
    canonical = None
    for path in _candidates(target, node):
        canonical = _canonical(_lookup(path))
        if canonical is not None:
            break
    if canonical is None and target and "." not in target:
        matches = {
            name
            for name in domain.objects
            if name.startswith("pyro_invres.") and name.endswith("." + target)
        }
        if len(matches) == 1:
            canonical = matches.pop()
    if canonical is None or canonical == target:
        return None
    return domain.resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], canonical, node, contnode
    )


_REFERENCE = re.compile(r"^\s*\[\d+\]")
_ARXIV = re.compile(r"arXiv:(\d{4}\.\d{4,5})")


def _format_references(app, what, name, obj, options, lines) -> None:  # noqa: ANN001
    """Render the house ``References:`` section (``[n] text`` with hanging indents).

    Each entry becomes one bullet on one line, arXiv ids become links; napoleon then
    renders the section as usual. Runs before napoleon (priority 400 < 500).
    """
    start = next((i for i, line in enumerate(lines) if line.strip() == "References:"), None)
    if start is None:
        return
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = start + 1
    while end < len(lines) and (
        not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent
    ):
        end += 1
    entries: list[str] = []
    for line in lines[start + 1 : end]:
        text = line.strip()
        if not text:
            continue
        if _REFERENCE.match(text) or not entries:
            entries.append(text)
        else:
            entries[-1] += " " + text
    link = r"`arXiv:\1 <https://arxiv.org/abs/\1>`__"
    body = [" " * (indent + 4) + "- " + _ARXIV.sub(link, entry) for entry in entries]
    lines[start + 1 : end] = [*body, ""]


def _package_modules() -> set[str]:
    """Every public module of the package, found on disk (nothing is imported)."""
    found = {"pyro_invres"}
    for info in pkgutil.walk_packages([str(ROOT / "pyro_invres")], prefix="pyro_invres."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            found.add(info.name)
    return found


def _check_coverage(app, env) -> None:  # noqa: ANN001
    documented = set(env.get_domain("py").modules) | OPTIONAL_MODULES
    for modname in sorted(_package_modules() - documented):
        logger.warning(
            f"{modname} has no API page: add '.. invres-module:: {modname}' to docs/api/"
        )


def setup(app):  # noqa: ANN001, ANN201
    app.add_directive("invres-module", InvresModule)
    app.add_directive("invres-exports", InvresExports)
    app.connect("autodoc-process-docstring", _format_references, priority=400)
    app.connect("missing-reference", _resolve_reexport)
    app.connect("env-check-consistency", _check_coverage)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
