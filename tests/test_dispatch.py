"""Backend selection: automatic by device, forced, and the fallback when the CPU extension is missing."""
import subprocess
import sys
import textwrap

import torch


def test_missing_extension_falls_back_with_one_warning():
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["celoss.cpu._kernels"] = None   # as if the compiled extension were absent
        import torch, celoss
        assert celoss.available_backends()["cython"] is not None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x, t = torch.randn(4, 9), torch.tensor([1, 2, 3, 4])
            a = celoss.cross_entropy(x, t)
            b = celoss.cross_entropy(x, t)
        assert torch.allclose(a, torch.nn.functional.cross_entropy(x, t)) and torch.equal(a, b)
        msgs = [str(w.message) for w in caught if "celoss" in str(w.message)]
        assert len(msgs) == 1 and "cython" in msgs[0] and "reference" in msgs[0], msgs
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_resolve_is_marked_constant_for_dynamo_as_torch_would_mark_it():
    """_dispatch marks ``resolve`` itself (torch.compiler.assume_constant_result would import dynamo
    at ``import celoss``): the mark must stay the one torch's decorator sets."""
    from celoss import _dispatch

    def probe():
        return "cython"

    marked = torch.compiler.assume_constant_result(probe)
    assert marked is probe and vars(probe) == vars(_dispatch.resolve) == {"_dynamo_marked_constant": True}
