"""Docstrings in the style of torch.nn.functional (issue 15): every public function and module of
celoss and celoss.distributed has Args, Shape, Returns and Example sections, Args names every
parameter, and every ``>>>`` example runs (on CPU) with the output it shows."""
import doctest
import inspect
import re

import pytest
import torch
import torch.nn.functional as F

import celoss
import celoss.distributed

PUBLIC = [(module, name) for module in (celoss, celoss.distributed) for name in module.__all__
          if callable(getattr(module, name))]
IDS = [f"{module.__name__}.{name}" for module, name in PUBLIC]
SECTIONS = ("Args", "Shape", "Returns", "Example")


def is_named_tuple(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")


def section_names(doc: str) -> set[str]:
    """Headers of Google-style sections: an unindented ``Name:`` (or ``Name::``) line."""
    return {m.group(1) for m in re.finditer(r"^(\w+)::?[ \t]*$", doc, re.MULTILINE)}


def args_entries(doc: str) -> list[str]:
    """The names documented in the Args section (its entries are indented by 4 spaces)."""
    body = re.search(r"^Args:\n((?:[ \t]+.*\n|\n)*)", doc + "\n", re.MULTILINE).group(1)
    return re.findall(r"^ {4}(\*{0,2}\w+)(?: \(.*\))?:", body, re.MULTILINE)


def parameters(obj) -> list[str]:
    """What Args must name: the call's (the constructor's, for a module) parameters."""
    prefix = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return [prefix.get(p.kind, "") + p.name for p in inspect.signature(obj).parameters.values()]


@pytest.mark.parametrize("module, name", PUBLIC, ids=IDS)
def test_issue15_docstring_sections(module, name):
    obj = getattr(module, name)
    doc = inspect.getdoc(obj) or ""
    found = section_names(doc)
    if is_named_tuple(obj):  # a result type: its fields and an example are what a reader needs
        assert {"Attributes", "Example"} <= found, f"{name}: sections {sorted(found)}"
        assert re.findall(r"^ {4}(\w+) \(", doc.split("Attributes:")[1], re.MULTILINE)[:len(obj._fields)] \
            == list(obj._fields), f"{name}: Attributes must describe the fields {obj._fields} in order"
        return
    missing = [s for s in SECTIONS if s not in found and s + "s" not in found]
    assert not missing, f"{module.__name__}.{name} lacks the docstring section(s) {missing}"
    documented = args_entries(doc)
    assert documented == parameters(obj), f"{name}: Args documents {documented}, expected {parameters(obj)}"


@pytest.mark.parametrize("module, name", PUBLIC, ids=IDS)
def test_issue15_docstring_examples_run(module, name):
    obj = getattr(module, name)
    tests = doctest.DocTestFinder(recurse=False).find(obj, f"{module.__name__}.{name}",
                                                      globs={"torch": torch, "F": F, "celoss": celoss})
    assert sum(len(t.examples) for t in tests) > 0, f"{name}: the docstring has no >>> example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    with torch.random.fork_rng(devices=[]):  # the examples seed torch: leave other tests' draws alone
        for test in tests:
            runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
