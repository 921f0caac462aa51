"""Every public function, class, method and property of cbn has a numpydoc
docstring that matches its signature.

Public: the names in ``cbn.__all__`` and in the ``__all__`` of every cbn
submodule without a leading underscore (modules without ``__all__``: their
functions and classes without a leading underscore), and the methods,
properties and attributes of those classes (``__call__`` included), wherever
in cbn they are defined. numpydoc is not needed: the sections are parsed here.
"""
import ast
import importlib
import inspect
import pkgutil
import pydoc
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

import cbn

# -- numpydoc sections, parsed


def sections(doc):
    """{title: [entry names]} of a numpydoc docstring's sections. An entry is
    a line at the section's own indentation; "a, b : type" names a and b."""
    lines = inspect.cleandoc(doc or "").splitlines()
    found, title = {}, None
    for k, line in enumerate(lines):
        if k + 1 < len(lines) and re.fullmatch(r"-{3,}", lines[k + 1].strip()) \
                and line.strip() and not line.startswith(" "):
            title = line.strip()
            found[title] = []
            continue
        if title is None or re.fullmatch(r"-{3,}", line.strip()):
            continue
        if line.strip() and not line.startswith(" "):
            names = line.split(" : ")[0] if " : " in line else line
            found[title].extend(name.strip() for name in names.split(",") if name.strip())
    return found


def test_sections_parser():
    doc = """Summary.

    Parameters
    ----------
    x : array_like
        The input.
    a, b : int
        Two numbers.
    *args
        More.

    Returns
    -------
    ndarray
        The result.
    """
    assert sections(doc) == {"Parameters": ["x", "a", "b", "*args"],
                             "Returns": ["ndarray"]}
    assert sections("One line.") == {}


# -- what is public


def public_modules():
    modules = [cbn]
    for info in pkgutil.iter_modules(cbn.__path__):
        if info.name.startswith("_"):
            continue
        name = f"cbn.{info.name}"
        try:
            modules.append(importlib.import_module(name))
        except ImportError as error:   # cbn.dask without Dask (an optional extra)
            if "dask" not in str(error).lower():
                raise
    return modules


def public_objects(module):
    names = getattr(module, "__all__", None)
    if names is None:
        names = [name for name, obj in vars(module).items()
                 if not name.startswith("_")
                 and getattr(obj, "__module__", None) == module.__name__
                 and (inspect.isfunction(obj) or inspect.isclass(obj))]
    objects = [getattr(module, name) for name in names]
    return [obj for obj in objects if inspect.isfunction(obj) or inspect.isclass(obj)]


def owner_of(cls, name):
    for klass in cls.__mro__:
        if name in vars(klass):
            return klass
    return None


def is_cbn(klass):
    return klass is not None and klass.__module__.split(".")[0] == "cbn"


# Where docs/api.md names each item: label -> the public name it is
# documented under (cbn.BatchNorm.forward for cbn.layer.BatchNorm.forward).
PUBLIC_NAMES = {}


def collect():
    """(label, kind, object, owner class or None), each defining object once."""
    seen, items = set(), []
    classes = []
    for module in public_modules():
        for obj in public_objects(module):
            key = ("object", id(obj))
            if key not in seen:
                seen.add(key)
                if inspect.isclass(obj):
                    classes.append(obj)
                kind = "class" if inspect.isclass(obj) else "function"
                label = f"{obj.__module__}.{obj.__qualname__}"
                PUBLIC_NAMES[label] = f"{module.__name__}.{obj.__name__}"
                items.append((label, kind, obj, None))
    for cls in classes:
        public = PUBLIC_NAMES[f"{cls.__module__}.{cls.__qualname__}"]
        for name in dir(cls):
            if name.startswith("_") and name != "__call__":
                continue
            owner = owner_of(cls, name)
            if not is_cbn(owner) or ("member", owner, name) in seen:
                continue
            seen.add(("member", owner, name))
            raw = vars(owner)[name]
            label = f"{owner.__module__}.{owner.__qualname__}.{name}"
            PUBLIC_NAMES[label] = f"{public}.{name}"
            if isinstance(raw, (classmethod, staticmethod)):
                items.append((label, "method", raw.__func__, owner))
            elif isinstance(raw, property):
                items.append((label, "property", raw, owner))
            elif inspect.isfunction(raw):
                items.append((label, "method", raw, owner))
            elif hasattr(raw, "__get__") and not inspect.isclass(raw):
                items.append((label, "descriptor", raw, owner))
    return items


ITEMS = collect()
CALLABLES = [item for item in ITEMS if item[1] in ("function", "method")]
CLASSES = [item for item in ITEMS if item[1] == "class"]


def parameter_names(function):
    names = []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is parameter.VAR_POSITIONAL:
            names.append("*" + parameter.name)
        elif parameter.kind is parameter.VAR_KEYWORD:
            names.append("**" + parameter.name)
        else:
            names.append(parameter.name)
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    return names


def returns_something(function):
    """From the return annotation, or, without one, from a ``return value``
    in the function's own body."""
    annotation = inspect.signature(function).return_annotation
    if annotation is not inspect.Signature.empty:
        return annotation not in (None, "None")
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    body = tree.body[0]

    def walk(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda,
                                  ast.ClassDef)):
                continue
            if isinstance(child, ast.Return) and child.value is not None:
                return True
            if walk(child):
                return True
        return False
    return walk(body)


@pytest.mark.parametrize("label, kind, function, owner", CALLABLES,
                         ids=[item[0] for item in CALLABLES])
def test_function_docstring(label, kind, function, owner):
    doc = function.__doc__
    assert doc and doc.strip(), f"{label} has no docstring"
    found = sections(doc)
    names = parameter_names(function)
    if names:
        assert "Parameters" in found, f"{label} takes {names} but has no Parameters section"
    assert found.get("Parameters", []) == names, (
        f"{label}: documented parameters {found.get('Parameters', [])} differ from the "
        f"signature's {names}")
    if returns_something(function):
        assert found.get("Returns"), f"{label} returns a value but has no Returns section"


@pytest.mark.parametrize("label, kind, cls, owner", CLASSES, ids=[item[0] for item in CLASSES])
def test_class_docstring(label, kind, cls, owner):
    doc = cls.__doc__
    assert doc and doc.strip(), f"{label} has no docstring"
    init = vars(cls).get("__init__")
    if inspect.isfunction(init):
        names = parameter_names(init)
        documented = sections(doc).get("Parameters", [])
        assert documented == names, (
            f"{label}: documented parameters {documented} differ from __init__'s {names}")


PROPERTIES = [item for item in ITEMS if item[1] == "property"]


@pytest.mark.parametrize("label, kind, prop, owner", PROPERTIES,
                         ids=[item[0] for item in PROPERTIES])
def test_property_says_what_it_holds(label, kind, prop, owner):
    assert prop.__doc__ and prop.__doc__.strip(), f"{label} has no docstring"


def documented_attributes(cls):
    names = set()
    for klass in cls.__mro__:
        if is_cbn(klass):
            names.update(sections(klass.__doc__).get("Attributes", []))
    return names


DESCRIPTORS = [item for item in ITEMS if item[1] == "descriptor"]


@pytest.mark.parametrize("label, kind, descriptor, owner", DESCRIPTORS,
                         ids=[item[0] for item in DESCRIPTORS])
def test_descriptor_attribute_is_in_the_attributes_section(label, kind, descriptor, owner):
    # weight, bias, running_mean, running_var: one descriptor class whose own
    # docstring cannot say which array it is, so the class documents them.
    assert label.rsplit(".", 1)[1] in documented_attributes(owner)


class _Comm:
    """The four methods SyncBatchNorm checks for, under MPI's names (never
    called here)."""

    def Allgather(self, *args):
        raise AssertionError

    Allreduce = Allgather

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1


INSTANCES = {
    "BatchNorm": lambda: cbn.BatchNorm(3),
    "BatchNorm2d": lambda: cbn.BatchNorm2d(3),
    "SyncBatchNorm": lambda: cbn.SyncBatchNorm(3, comm=_Comm()),
    "FrozenBatchNorm": lambda: cbn.BatchNorm(3).freeze(),
    "Moments": lambda: cbn.Moments(3),
    "DistributedError": lambda: cbn.distributed.DistributedError("failed", {0: "x"}),
}


@pytest.mark.parametrize("name", sorted(INSTANCES))
def test_instance_attributes_are_documented(name):
    obj = INSTANCES[name]()
    if type(obj) is cbn.BatchNorm:   # the attributes a forward and a backward set
        obj.backward(obj(np.ones((4, 3), np.float32)))
    plain = [key for key in getattr(obj, "__dict__", {}) if not key.startswith("_")]
    missing = [key for key in plain if key not in documented_attributes(type(obj))]
    assert not missing, f"{name}: instance attributes {missing} are not in an Attributes section"


def test_help_shows_the_layer_attributes_and_modes():
    text = pydoc.render_doc(cbn.BatchNorm, renderer=pydoc.plaintext)
    for word in ("training", "num_batches_tracked", "grad_weight", "grad_bias",
                 "running_mean", "running_var", "weight", "bias", "train(self",
                 "eval(self", "forward(self", "backward(self", "mask"):
        assert word in text, f"help(cbn.BatchNorm) does not show {word!r}"


API_MD = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def test_api_reference_lists_every_public_item():
    headings = {re.sub(r" \(property\)$", "", line.lstrip("#").strip())
                for line in API_MD.read_text().splitlines() if line.startswith("#")}
    missing = sorted(name for label, kind, *_ in ITEMS if kind != "descriptor"
                     for name in [PUBLIC_NAMES[label]] if name not in headings)
    assert not missing, (f"docs/api.md lacks {missing}: run "
                         "`PYTHONPATH=. python docs/make_api.py` against a built cbn")
