"""Build: maps kernels/ -> celoss.kernels and cpu/ -> celoss.cpu, compiles the OpenMP CPU kernels.

The CPU kernels are portable x86-64 by default; the hot loops carry per-ISA clones
(AVX-512 / AVX2 / baseline) chosen at load time (see cpu/fastmath.h). Set
CELOSS_NATIVE=1 to build for the host CPU only.
"""
import glob
import os
import sys

from setuptools import Extension, setup

compile_args = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
                "-fno-signed-zeros", "-fassociative-math", "-freciprocal-math"]
if os.environ.get("CELOSS_NATIVE") == "1":
    compile_args.append("-march=native")

ext_modules = []
if sys.platform.startswith("linux") and os.environ.get("CELOSS_NO_EXT") != "1":
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [Extension(f"celoss.cpu.{os.path.basename(pyx)[:-4]}", [pyx], include_dirs=["cpu"],
                   extra_compile_args=compile_args, extra_link_args=["-fopenmp"])
         for pyx in sorted(glob.glob("cpu/*.pyx"))],
        compiler_directives={"language_level": 3, "boundscheck": False, "wraparound": False,
                             "cdivision": True, "initializedcheck": False},
    )

setup(
    packages=["celoss", "celoss.backends", "celoss.integrations", "celoss.kernels", "celoss.cpu"],
    package_dir={"celoss": "celoss", "celoss.kernels": "kernels", "celoss.cpu": "cpu"},
    package_data={"celoss.cpu": ["*.pyx", "*.pxd", "*.h"]},
    ext_modules=ext_modules,
)
