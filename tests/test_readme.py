"""The README's examples cannot rot (issue 15): every ```python block preceded by the line
``<!-- runnable -->`` runs here, on CPU, each as the ``__main__`` module of its own fresh namespace,
all in one interpreter started for them (in an empty folder, as a user's script runs); and
every public name of celoss appears in a runnable example."""
import json
import os
import re
import subprocess
import sys

import pytest

import celoss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
MARK = "<!-- runnable -->"

# Runs each block (JSON list on stdin) as the source of a fresh module registered as __main__ (so
# `if __name__ == "__main__":` holds and a fork-started pool finds the block's functions), and
# prints one JSON line per block: its index and the traceback, or None.
DRIVER = r"""
import json, sys, traceback, types
blocks = json.load(sys.stdin)
real_main = sys.modules["__main__"]
for i, (name, source) in enumerate(blocks):
    module = types.ModuleType("__main__")
    module.__file__ = f"<README: {name}>"
    sys.modules["__main__"] = module
    try:
        exec(compile(source, module.__file__, "exec"), module.__dict__)
        error = None
    except BaseException:
        error = traceback.format_exc()
    finally:
        sys.modules["__main__"] = real_main
    print(json.dumps({"index": i, "error": error}), flush=True)
"""


def runnable_blocks(text: str) -> list[tuple[str, str]]:
    """(id, source) of each runnable block: the id is the heading above it, numbered within it."""
    blocks, heading, seen, fenced = [], "top", {}, False
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif line.startswith("#") and not fenced:
            heading = re.sub(r"[^a-z0-9]+", "-", line.lstrip("#").strip().lower()).strip("-")
        elif line.strip() == MARK:
            fence = lines[i + 1].strip() if i + 1 < len(lines) else ""
            assert fence == "```python", f"README line {i + 2}: {MARK} must precede a ```python block"
            end = lines.index("```", i + 2)
            seen[heading] = seen.get(heading, 0) + 1
            blocks.append((f"{heading}-{seen[heading]}", "\n".join(lines[i + 2:end]) + "\n"))
    return blocks


with open(README) as _f:
    TEXT = _f.read()
BLOCKS = runnable_blocks(TEXT)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CELOSS_BACKEND")}
    # the celoss these tests import, whether installed or in the checkout
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.path.dirname(os.path.dirname(celoss.__file__)))
    proc = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(BLOCKS), capture_output=True,
                          text=True, cwd=tmp_path_factory.mktemp("readme"), env=env, timeout=300)
    done = {}
    for line in proc.stdout.splitlines():
        if line.startswith('{"index"'):
            row = json.loads(line)
            done[row["index"]] = row["error"]
    return done, proc


def test_issue15_readme_marks_runnable_examples():
    assert len(BLOCKS) >= 10
    assert len({name for name, _ in BLOCKS}) == len(BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[name for name, _ in BLOCKS])
def test_issue15_readme_example_runs(results, index):
    done, proc = results
    assert index in done, f"the driver stopped before this block (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    assert done[index] is None, f"README block {BLOCKS[index][0]}:\n{BLOCKS[index][1]}\n{done[index]}"


def test_issue15_every_public_name_has_a_runnable_example():
    code = "\n".join(source for _, source in BLOCKS)
    missing = [name for name in celoss.__all__ if not re.search(rf"\b{name}\b", code)]
    missing += [name for name in ("vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy",
                                  "vocab_range") if name not in code]
    assert not missing, f"no runnable README example mentions {missing}"


def test_issue15_readme_installs_from_the_checkout():
    # no PyPI release: installs are from the checkout
    assert "pip install '.[transformers]'" in TEXT
    assert not re.search(r"pip install '?celoss", TEXT)


def test_issue15_block_extraction():
    text = "# A\n\n<!-- runnable -->\n```python\nx = 1\n```\n\n```python\nnot_run()\n```\n\n## B b\n\n" \
           "<!-- runnable -->\n```python\n# comment, not a heading\ny = 2\n```\n<!-- runnable -->\n```python\nz = 3\n```\n"
    assert runnable_blocks(text) == [("a-1", "x = 1\n"), ("b-b-1", "# comment, not a heading\ny = 2\n"),
                                     ("b-b-2", "z = 3\n")]
    with pytest.raises(AssertionError, match="must precede"):
        runnable_blocks("<!-- runnable -->\n```bash\nls\n```\n")
