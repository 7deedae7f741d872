#!/usr/bin/env bash
# The slow tests with more than 2**31 output elements (tests/test_large.py): 64-bit indexing in conv1d
# (channel offsets), conv_transpose2d (row offsets within one plane) and pad. Not run by CI: the tests skip
# themselves unless CONVFAST_RUN_SLOW=1 (set here) and >= 20 GiB of memory is available.
#
#   bash scripts/run_large.sh                 # PYTHON=/path/to/venv/bin/python to test another install
#
# Needs ~11 GiB at peak (one test at a time) and a few minutes on 2 cores. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
start=$SECONDS
"$PYTHON" -c 'import convfast, convfast._core as c; print("convfast", convfast.__version__, "from", c.__file__)'
CONVFAST_RUN_SLOW=1 "$PYTHON" -m pytest -q -m slow tests/test_large.py -p no:cacheprovider --durations=0 -rs "$@"
echo "run_large.sh: $((SECONDS - start)) s"
