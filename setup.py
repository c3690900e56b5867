"""Build the kvmmu._core extension.

OpenMP is used when the compiler supports it (probed by compiling a tiny
program); otherwise the extension is built serial and ``prange`` degrades to a
plain loop. ``KVMMU_DEBUG=1`` at build time turns Cython's bounds and
wraparound checks on and drops optimisation, for the debug CI job and fuzzing.
``KVMMU_NO_OPENMP=1`` forces the serial build.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup


def _compiler() -> str:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return cc.split()[0]


def _has_openmp() -> bool:
    if os.environ.get("KVMMU_NO_OPENMP") == "1" or sys.platform == "win32":
        return False
    cc = _compiler()
    if shutil.which(cc) is None:
        return False
    src = "#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n"
    with tempfile.TemporaryDirectory() as d:
        c = os.path.join(d, "t.c")
        with open(c, "w") as f:
            f.write(src)
        try:
            r = subprocess.run([cc, "-fopenmp", c, "-o", os.path.join(d, "t")],
                               capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
        return r.returncode == 0


DEBUG = os.environ.get("KVMMU_DEBUG") == "1"
OPENMP = _has_openmp()

extra_compile = ["-O0", "-g"] if DEBUG else ["-O3"]
extra_link = []
if OPENMP:
    extra_compile.append("-fopenmp")
    extra_link.append("-fopenmp")
if os.environ.get("KVMMU_CFLAGS"):
    extra_compile += os.environ["KVMMU_CFLAGS"].split()
    extra_link += os.environ.get("KVMMU_LDFLAGS", os.environ["KVMMU_CFLAGS"]).split()

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}

ext = Extension(
    "kvmmu._core",
    ["src/kvmmu/_core.pyx"],
    depends=["src/kvmmu/_access.pxi"],
    include_dirs=[numpy.get_include()],
    extra_compile_args=extra_compile,
    extra_link_args=extra_link,
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION"),
                   ("KVMMU_DEBUG_BUILD", "1" if DEBUG else "0")],
)

print(f"kvmmu build: openmp={'on' if OPENMP else 'off'} debug={'on' if DEBUG else 'off'}",
      file=sys.stderr)

setup(ext_modules=cythonize([ext], compiler_directives=directives,
                            force=DEBUG or None))
