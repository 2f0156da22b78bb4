"""Only for the compiled build: ``HL7ENGINE_COMPILE=1 pip install --no-build-isolation --no-deps .``
compiles the modules listed in engine/accel.py with mypyc (mypy, a C compiler and the engine's
dependencies must be installed first: mypyc type-checks the modules as mypy does).
Without HL7ENGINE_COMPILE the package is pure Python and everything else is in pyproject.toml."""

import os
import runpy

from setuptools import setup

ext_modules = []
if os.environ.get("HL7ENGINE_COMPILE") == "1":
    try:
        from mypyc.build import mypycify
    except ImportError:
        raise SystemExit("HL7ENGINE_COMPILE=1 needs mypy and the engine's dependencies in the build "
                         "environment: pip install mypy setuptools wheel . , then HL7ENGINE_COMPILE=1 pip install "
                         "--no-build-isolation --no-deps --force-reinstall .") from None
    accel = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "engine", "accel.py"))
    # one shared library for all of them, inside the package (engine/native__mypyc.*): importable
    # wherever the package is, an editable install included
    ext_modules = mypycify(list(accel["MODULES"]), opt_level=os.environ.get("MYPYC_OPT_LEVEL", "3"),
                           group_name=accel["GROUP_NAME"])

setup(ext_modules=ext_modules)
