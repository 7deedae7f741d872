"""The layer suite shared by asv and ``python -m convfast bench``: a re-export of convfast._bench_suite.

The suite lives inside the package (python/convfast/_bench_suite.py) so that the command line works
from an installed wheel. asv measures many commits with the benchmarks of the current checkout, so
this module loads the suite from the checkout's source file (it uses only convfast's public API),
and falls back to the installed ``convfast._bench_suite`` when the source file is not there.
"""
import importlib.util
import os
import sys

_NAME = "convfast_bench_suite_checkout"
_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python", "convfast", "_bench_suite.py")

if _NAME in sys.modules:
    _suite = sys.modules[_NAME]
elif os.path.exists(_PATH):
    _spec = importlib.util.spec_from_file_location(_NAME, _PATH)
    _suite = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _suite  # dataclasses resolve their module through sys.modules
    _spec.loader.exec_module(_suite)
else:
    from convfast import _bench_suite as _suite

__all__ = list(_suite.__all__)
globals().update({name: getattr(_suite, name) for name in __all__})
