"""Write docs/api.md, the API reference, from cbn's docstrings.

Run from the repository root against a built cbn (installed, or built in
place with PYTHONPATH=.): ``python docs/make_api.py``. The reference lists
every public function, class, method and property with its signature and
docstring; tests/test_docstrings.py checks that each appears in it.
"""
from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import cbn

OUT = Path(__file__).resolve().parent / "api.md"

# (public name, object), in reading order: the layers first, then the
# functions, then the submodules.
TOP = [
    "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
    "FrozenBatchNorm", "Moments",
    "batch_norm", "batch_stats", "batch_norm_forward", "batch_norm_backward",
    "fold_into_linear", "fold_into_conv", "save", "load",
    "set_num_threads", "get_num_threads", "show_config",
]
SUBMODULES = ["cbn.distributed", "cbn.dask", "cbn.reference", "cbn.calibration"]


class _Default:
    """A default value shown as code (``numpy.float32``, not its repr)."""

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        if inspect.isclass(self.value):
            module = "numpy" if self.value.__module__ == "numpy" else self.value.__module__
            return f"{module}.{self.value.__name__}"
        return repr(self.value)


def signature(obj, name):
    """``name(parameters)`` without annotations (help() shows those)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    empty = inspect.Parameter.empty
    sig = sig.replace(
        parameters=[p.replace(annotation=empty,
                              default=empty if p.default is empty else _Default(p.default))
                    for p in sig.parameters.values()],
        return_annotation=inspect.Signature.empty)
    text = str(sig)
    text = re.sub(r"^\(self, ?", "(", text).replace("(self)", "()")
    text = re.sub(r"^\(cls, ?", "(", text)
    return f"{name}{text}"


def render_doc(doc):
    """numpydoc text as Markdown: sections as bold titles, entries as list
    items, descriptions joined to their entry."""
    lines = inspect.cleandoc(doc or "(no docstring)").splitlines()
    out, k = [], 0
    in_section = False
    while k < len(lines):
        line = lines[k]
        is_title = (k + 1 < len(lines) and re.fullmatch(r"-{3,}", lines[k + 1].strip())
                    and line.strip() and not line.startswith(" "))
        if is_title:
            out += ["", f"**{line.strip()}**", ""]
            in_section = line.strip() not in ("Notes", "Examples")
            k += 2
            continue
        if line.startswith((">>>", "...")):
            block = []
            while k < len(lines) and lines[k].strip():
                block.append(lines[k])
                k += 1
            out += ["```python", *block, "```"]
            continue
        if in_section and line.strip() and not line.startswith(" "):
            name, _, kind = line.partition(" : ")
            names = (", ".join(f"`{n.strip()}`" for n in name.split(",")) if kind
                     else f"`{name.strip()}`")
            description = []
            k += 1
            while k < len(lines) and (lines[k].startswith(" ") or not lines[k].strip()):
                if lines[k].strip():
                    description.append(lines[k].strip())
                k += 1
            head = f"- {names}" + (f" ({kind.strip()})" if kind else "")
            out.append(head + (": " + " ".join(description) if description else ""))
            continue
        out.append(line)
        k += 1
    text = "\n".join(out).strip() + "\n"
    text = re.sub(r":(?:meth|class|func|mod|attr):`~?([^`]+)`", r"`\1`", text)
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def members(cls):
    """Public methods and properties visible on ``cls`` that cbn defines."""
    found = []
    for name in sorted(dir(cls)):
        if name.startswith("_") and name != "__call__":
            continue
        owner = next((k for k in cls.__mro__ if name in vars(k)), None)
        if owner is None or owner.__module__.split(".")[0] != "cbn":
            continue
        raw = vars(owner)[name]
        if isinstance(raw, (classmethod, staticmethod)):
            found.append((name, raw.__func__, "method"))
        elif isinstance(raw, property):
            found.append((name, raw, "property"))
        elif inspect.isfunction(raw):
            found.append((name, raw, "method"))
    return found


def own_members(cls):
    """The members a subclass defines itself (the rest are its base's)."""
    return [m for m in members(cls) if m[0] in vars(cls)]


def entry(hashes, label, obj, kind=None):
    """A heading named by ``label`` (short anchors), then the signature and
    the docstring."""
    if kind == "property":
        return f"{hashes} {label} (property)\n\n{render_doc(obj.__doc__)}"
    return (f"{hashes} {label}\n\n```\n{signature(obj, label)}\n```\n\n"
            f"{render_doc(obj.__doc__)}")


def section_for(public, obj, level=2):
    hashes = "#" * level
    parts = [entry(hashes, public, obj)]
    if inspect.isclass(obj):
        base = next((b for b in obj.__mro__[1:] if b.__name__ in TOP), None)
        listed = own_members(obj) if base is not None else members(obj)
        if base is not None:
            parts.append(f"Every method and property of `cbn.{base.__name__}`"
                         + (", and:\n" if listed else ".\n"))
        for name, member, kind in listed:
            parts.append(entry(hashes + "#", f"{public}.{name}", member, kind))
    return "\n".join(parts)


def public_of(module):
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, o in vars(module).items() if not n.startswith("_")
                 and getattr(o, "__module__", None) == module.__name__
                 and (inspect.isfunction(o) or inspect.isclass(o))]
    return [(n, getattr(module, n)) for n in names
            if inspect.isfunction(getattr(module, n)) or inspect.isclass(getattr(module, n))]


def main():
    text = ["# API reference",
            "",
            "Every public function, class, method and property of cbn, with its "
            "signature and docstring (what `help()` shows). Written by "
            "`python docs/make_api.py` from the docstrings; the rules behind the "
            "calls are in [semantics.md](semantics.md).",
            "",
            "## Contents",
            ""]
    text += [f"- [cbn.{name}](#cbn{name.lower()})" for name in TOP]
    text += [f"- [{name}](#{name.replace('.', '')})" for name in SUBMODULES]
    text.append("")
    for name in TOP:
        text.append(section_for(f"cbn.{name}", getattr(cbn, name)))
    for module_name in SUBMODULES:
        module = importlib.import_module(module_name)
        text.append(f"## {module_name}\n\n{render_doc(module.__doc__)}")
        for name, obj in public_of(module):
            text.append(section_for(f"{module_name}.{name}", obj, level=3))
    OUT.write_text("\n".join(text).rstrip() + "\n")


if __name__ == "__main__":
    main()
