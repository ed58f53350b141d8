"""Every public class and function has a docstring with a runnable example.

The project rule: a name listed in a module's ``__all__`` and defined in that module has
a Google-style docstring with a doctest (``>>>``), which ``pytest --doctest-modules``
runs; every public method defined in a public class has a docstring (its own, or the one
of the base-class method it overrides).
"""

import importlib
import inspect
import pkgutil

import pyro_invres


def _modules():
    yield pyro_invres
    for info in pkgutil.walk_packages(pyro_invres.__path__, prefix="pyro_invres."):
        yield importlib.import_module(info.name)


def _public_objects():
    """``(qualified name, object)`` for classes and functions a module defines and exports."""
    for module in _modules():
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name, None)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if getattr(obj, "__module__", None) != module.__name__:
                continue  # re-exported: checked where it is defined
            yield f"{module.__name__}.{name}", obj


def test_walk_finds_the_package():
    names = [name for name, _ in _public_objects()]
    assert "pyro_invres.ops.fixed_point.solve_fixed_point" in names
    assert "pyro_invres.transforms.iresnet.InvertibleResidual" in names
    assert len(names) == len(set(names))


def test_public_names_have_doctest_examples():
    missing = sorted(name for name, obj in _public_objects() if ">>>" not in (obj.__doc__ or ""))
    assert not missing, "public names without a '>>>' example:\n" + "\n".join(missing)


def test_public_methods_have_docstrings():
    missing = []
    for name, obj in _public_objects():
        if not inspect.isclass(obj):
            continue
        for attr, member in vars(obj).items():
            if attr.startswith("_") or not inspect.isfunction(member):
                continue
            # an override of a documented base-class method (``forward``, ``extra_repr``,
            # Pyro's ``forward_shape``) inherits that docstring, as ``help`` shows it
            if not inspect.getdoc(member):
                missing.append(f"{name}.{attr}")
    missing.sort()
    assert not missing, "public methods without a docstring:\n" + "\n".join(missing)
