"""Packaging (issue 15): the sdist and the wheel are complete and clean, and the wheel, installed in a
fresh venv outside the source tree, works with no source folder on ``sys.path``.

The sdist is built from this checkout, the wheel from the unpacked sdist (in a temporary folder, so
the checkout's build/ is untouched), with the CPU kernels compiled: the smoke test must see the
compiled kernels load, so ``CELOSS_NO_EXT`` is not an option here. That build is most of the time
(about 2 minutes on 2 quiet cores). ``CELOSS_SKIP_PACKAGING_TEST=1`` skips the module.

The fresh venv sees the running environment's packages (torch, numpy, triton) through a ``.pth``
line, so nothing is reinstalled: ``python -m venv --system-site-packages`` would expose the base
interpreter's packages instead, which lack torch when the tests run in a venv (as ``make test`` does).
A ``.pth`` line adds a folder to ``sys.path`` without running that folder's own ``.pth`` files, so the
editable install of the running environment (if any) stays out.
"""
import os
import pathlib
import site
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import pytest

import celoss

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.packaging,
              pytest.mark.skipif(os.environ.get("CELOSS_SKIP_PACKAGING_TEST") == "1",
                                 reason="CELOSS_SKIP_PACKAGING_TEST=1"),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU kernels build on Linux only")]
BUILD_ENV = {k: v for k, v in os.environ.items()
             if k not in ("CELOSS_NO_EXT", "CELOSS_NATIVE", "PYTHONPATH", "TRITON_INTERPRET")}


def _run(args, **kwargs):
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(sdist member names, wheel path, python of a fresh venv with the wheel installed, its folder)."""
    tmp = tmp_path_factory.mktemp("packaging")
    # the sdist needs no compiler: CELOSS_NO_EXT keeps Cython from writing cpu/*.c into the checkout
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    name = _run([sys.executable, "-c", code, tmp / "dist"], cwd=ROOT, env=dict(BUILD_ENV, CELOSS_NO_EXT="1"),
                timeout=300).stdout.split()[-1]
    with tarfile.open(tmp / "dist" / name) as sdist:
        members = sdist.getnames()
        sdist.extractall(tmp / "src")
    source = tmp / "src" / name[:-len(".tar.gz")]
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "--no-index",
          "-w", tmp / "wheel", source], cwd=tmp, env=BUILD_ENV, timeout=900)
    wheel = next((tmp / "wheel").glob("celoss-*.whl"))

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", venv], timeout=300)
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], cwd=tmp, env=BUILD_ENV,
         timeout=300)
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    outer = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    (pathlib.Path(purelib) / "_celoss_test_outer_env.pth").write_text("\n".join(outer) + "\n")
    return members, wheel, python, tmp


def test_sdist_holds_what_the_tests_need_and_no_build_output(built):
    members = {m.split("/", 1)[1] for m in built[0] if "/" in m}
    needed = {"LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in",
              "celoss/py.typed", "tests/conftest.py", "tests/kernels/test_cross_entropy_kernels.py",
              "tests/cpu/test_cpu_kernels.py", "tests/benchmarks/test_benchmarks.py", "benchmarks/__main__.py",
              "examples/train_lm.py", "scripts/gpu-check", "cpu/_kernels.pyx", "cpu/ce_rows.h",
              "kernels/cross_entropy.py"}
    assert needed <= members, needed - members
    if (ROOT / ".git").exists():  # (not when the tests run from an unpacked sdist)
        tracked_tests = _run(["git", "ls-files", "tests"], cwd=ROOT).stdout.split()
        assert {t for t in tracked_tests if t.endswith(".py")} <= members
    assert not [m for m in members if m.endswith((".c", ".so", ".pyc")) or m.startswith("benchmarks/results")]


def test_wheel_is_clean_small_and_complete(built):
    wheel = built[1]
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = f"celoss-{celoss.__version__}.dist-info"
    assert wheel.name.startswith(f"celoss-{celoss.__version__}-")
    assert {n.split("/")[0] for n in names} == {"celoss", dist_info}, names  # no top-level kernels/ or cpu/
    assert {"celoss/py.typed", "celoss/kernels/cross_entropy.py", "celoss/cpu/_kernels.pyx",
            f"{dist_info}/licenses/LICENSE"} <= set(names)
    assert not [n for n in names if n.endswith(".c")], "Cython's generated C is in the wheel"
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata and "Classifier: Typing :: Typed" in metadata
    assert f"{dist_info}/entry_points.txt" not in names  # the celoss-bench script is gone
    pyx = sorted(p.stem for p in ROOT.glob("cpu/*.pyx"))
    extensions = sorted(n for n in names if n.endswith(".so"))
    assert [pathlib.PurePath(n).name.split(".")[0] for n in extensions] == pyx
    with zipfile.ZipFile(wheel) as archive:
        for n in extensions:
            data = archive.read(n)
            assert b".debug_info" not in data and b".symtab" not in data, f"{n} has debug info or symbols"
            assert len(data) < 6 << 20, f"{n}: {len(data) >> 20} MiB"


SMOKE = textwrap.dedent("""
    import importlib.metadata, importlib.util, pathlib, sys
    root = pathlib.Path(sys.argv[1]).resolve()
    sources = {root} | {root / d for d in ("celoss", "kernels", "cpu", "tests", "benchmarks")}
    assert not [p for p in sys.path if p and pathlib.Path(p).resolve() in sources], sys.path
    import torch, torch.nn.functional as F
    import celoss
    assert not {"triton", "transformers", "torch._dynamo"} & set(sys.modules)
    installed = pathlib.Path(celoss.__file__).resolve().parent
    assert pathlib.Path(sys.prefix).resolve() in installed.parents, installed
    assert (installed / "py.typed").is_file()
    assert celoss.__version__ == importlib.metadata.version("celoss")
    import celoss.cpu._kernels as compiled
    assert pathlib.Path(compiled.__file__).parent == installed / "cpu" and compiled.__file__.endswith(".so")
    expected = {"cython": None, "torch": None}
    if importlib.util.find_spec("triton") is not None:
        expected["triton"] = None
    available = celoss.available_backends()
    assert {k: available[k] for k in expected} == expected, available
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 37, generator=g), torch.randint(0, 37, (6,), generator=g)
    w = torch.randn(37, 8, generator=g)  # linear_cross_entropy: hidden = the first 8 columns of x
    t, s = torch.rand(6, 37, generator=g), torch.randn(6, 37, generator=g)
    w64, t64, s64 = w.double(), t.double(), s.double()  # the oracles compute in float64

    def focal(x):
        logp = x.log_softmax(1).gather(1, y[:, None])
        return (-(1 - logp.exp()) ** 2 * logp).mean()

    def sigmoid_focal(x):
        p = x.sigmoid()
        one_minus_pt = p * (1 - t64) + (1 - p) * t64
        ce = F.binary_cross_entropy_with_logits(x, t64, reduction="none")
        return (ce * one_minus_pt ** 2 * (0.25 * t64 + 0.75 * (1 - t64))).mean()

    cases = {  # name: (celoss call, the same loss composed in PyTorch)
        "cross_entropy": (lambda x, b: celoss.cross_entropy(x, y, backend=b), lambda x: F.cross_entropy(x, y)),
        "linear_cross_entropy": (lambda x, b: celoss.linear_cross_entropy(x[:, :8], w, y, backend=b),
                                 lambda x: F.cross_entropy(x[:, :8] @ w64.T, y)),
        "binary_cross_entropy_with_logits": (lambda x, b: celoss.binary_cross_entropy_with_logits(x, t, backend=b),
                                             lambda x: F.binary_cross_entropy_with_logits(x, t64)),
        "focal_loss": (lambda x, b: celoss.focal_loss(x, y, backend=b), focal),
        "sigmoid_focal_loss": (lambda x, b: celoss.sigmoid_focal_loss(x, t, reduction="mean", backend=b),
                               sigmoid_focal),
        "distillation_loss": (lambda x, b: celoss.distillation_loss(x, s, backend=b),
                              lambda x: F.kl_div(x.log_softmax(-1), s64.log_softmax(-1), log_target=True,
                                                 reduction="batchmean")),
    }
    for backend in expected:
        for name, (ours, theirs) in cases.items():
            xa, xb = x.clone().requires_grad_(), x.double().requires_grad_()
            a, b = ours(xa, backend), theirs(xb)
            a.backward(), b.backward()
            assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-6), (backend, name, a.item(), b.item())
            assert torch.allclose(xa.grad.double(), xb.grad, rtol=1e-4, atol=1e-6), (backend, name)
    print("smoke ok:", ", ".join(expected), "x", len(cases))
""")


def test_installed_wheel_works_outside_the_source_tree(built):
    _, _, python, tmp = built
    env = dict(BUILD_ENV, TRITON_INTERPRET="1")  # the Triton kernels run on CPU through the interpreter
    proc = _run([python, "-c", SMOKE, ROOT], cwd=tmp, env=env, timeout=600)
    assert "smoke ok: cython, torch" in proc.stdout, proc.stdout


def test_running_from_the_checkout_warns_that_it_shadows_the_installed_wheel(built):
    _, _, python, _ = built
    code = "import celoss; print(celoss.available_backends())"
    proc = _run([python, "-c", code], cwd=ROOT, env=BUILD_ENV, timeout=300)
    assert "imported from its source folder" in proc.stderr and "shadows the installed celoss" in proc.stderr, \
        proc.stderr
    assert "pip install -e ." in proc.stderr
