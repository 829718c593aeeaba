"""``import celoss`` stays light (issue 15): Triton, transformers and torch._dynamo load only when used,
and importing the source folder instead of an installed package warns."""
import json
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("triton", "transformers", "torch._dynamo", "torch._inductor")


def _python(code, **kwargs):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, **kwargs)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_import_loads_neither_triton_nor_transformers_nor_dynamo():
    """(The first call of a loss does import torch._dynamo, and Triton through it: torch.library's
    custom ops wrap their implementations in torch._disable_dynamo, which imports it then.)"""
    proc = _python(f"""
        import json, sys
        import celoss
        print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
    """)
    assert json.loads(proc.stdout.splitlines()[-1]) == []
    assert "celoss" not in proc.stderr, proc.stderr  # no warning either


def test_importing_the_source_folder_without_its_kernels_warns():
    """As after a plain ``pip install .`` run from the checkout's root: only the standard path finders
    (no editable-install finder mapping celoss.kernels to kernels/), the checkout first on sys.path."""
    proc = _python(f"""
        import sys, warnings
        sys.meta_path[:] = [f for f in sys.meta_path
                            if getattr(f, "__module__", "") in ("_frozen_importlib", "_frozen_importlib_external")]
        sys.path.insert(0, {str(ROOT)!r})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import celoss
        assert celoss.available_backends()["cython"] is not None
        messages = [str(w.message) for w in caught if "source folder" in str(w.message)]
        assert len(messages) == 1 and "pip install -e ." in messages[0], messages
        print("warned")
    """)
    assert "warned" in proc.stdout
