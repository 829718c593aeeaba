"""Backend selection: automatic by device, forced, and the fallback when the CPU extension is missing."""
import subprocess
import sys
import textwrap


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


def test_wheel_installs_only_the_celoss_package(tmp_path):
    """kernels/ and cpu/ ship as celoss.kernels and celoss.cpu; nothing lands as plain kernels or cpu."""
    import os
    import zipfile
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, CELOSS_NO_EXT="1")  # the file layout doesn't depend on compiling
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                    "-w", str(tmp_path), root], check=True, env=env, timeout=300)
    names = zipfile.ZipFile(next(tmp_path.glob("celoss-*.whl"))).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"celoss", next(t for t in tops if t.endswith(".dist-info"))}, tops
    assert "celoss/kernels/cross_entropy.py" in names and "celoss/cpu/_kernels.pyx" in names
