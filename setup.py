"""Build: maps kernels/ -> celoss.kernels and cpu/ -> celoss.cpu, compiles the OpenMP CPU kernels.

The CPU kernels are portable x86-64 by default; the hot loops carry per-ISA clones
(AVX-512 / AVX2 / baseline) chosen at load time, and bf16 stores use AVX512-BF16 where the CPU has
it (a target attribute plus a cpuid check at load: no build flag; see cpu/ce_rows.h). Set
CELOSS_NATIVE=1 to build for the host CPU only, CELOSS_NO_EXT=1 to skip the compiled
kernels (CPU calls then run the torch reference backend). The metadata is in pyproject.toml.
"""
import glob
import os
import sys

from setuptools import Extension, setup

# -g0 and -s: Python's own CFLAGS carry -g, which made _kernels.so 11 MB of debug info
compile_args = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
                "-fno-signed-zeros", "-freciprocal-math"]
link_args = ["-fopenmp", "-s"]
if os.environ.get("CELOSS_NATIVE") == "1":  # the host's ISA only: no per-ISA clones (a third of the build)
    compile_args += ["-march=native", "-DCE_NO_CLONES"]
# The one place that decides reassociation, per extension. The cross-entropy and log-prob rows
# (ce_rows.h, logprobs.h) need it to vectorize their float reductions and keep the differences
# that must not be regrouped behind CE_KEEP. The loss family (family.h) goes without: its
# reductions vectorize through "omp simd reduction" anyway, and reassociation would turn
# (a - max) - log(sum) into a - (max + log(sum)), losing the cancellation of large common offsets
# (measured: 1e3x larger gradient errors at |logits| ~ 1e4).
REASSOCIATE, EXACT_ORDER = ["-fassociative-math"], {"_family"}  # EXACT_ORDER: built without it
headers = sorted(glob.glob("cpu/*.h") + glob.glob("cpu/*.pxd"))  # a change to one rebuilds all

ext_modules = []
if sys.platform.startswith("linux") and os.environ.get("CELOSS_NO_EXT") != "1":
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [Extension(f"celoss.cpu.{name}", [f"cpu/{name}.pyx"], include_dirs=["cpu"],
                   extra_compile_args=compile_args + ([] if name in EXACT_ORDER else REASSOCIATE),
                   extra_link_args=link_args, depends=headers)
         for name in sorted(os.path.basename(pyx)[:-4] for pyx in glob.glob("cpu/*.pyx"))],
        include_path=["cpu"],  # _dtypes.pxd (cimported by every .pyx)
        compiler_directives={"language_level": 3, "boundscheck": False, "wraparound": False,
                             "cdivision": True, "initializedcheck": False},
    )

setup(
    packages=["celoss", "celoss.backends", "celoss.distributed", "celoss.integrations", "celoss.kernels", "celoss.cpu"],
    package_dir={"celoss": "celoss", "celoss.kernels": "kernels", "celoss.cpu": "cpu"},
    package_data={"celoss": ["py.typed"], "celoss.cpu": ["*.pyx", "*.pxd", "*.h"]},
    exclude_package_data={"celoss.cpu": ["*.c"]},  # Cython's generated C: rebuilt from the .pyx
    ext_modules=ext_modules,
    # the extensions compile side by side (each takes a minute or more at -O3 with its ISA clones)
    options={"build_ext": {"parallel": os.cpu_count() or 1}},
)
