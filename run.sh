#!/usr/bin/env bash
# The project's one entry point; it sets up a fresh machine by itself (a virtual environment in
# .venv, the CPU build of torch when no torch is installed, this package and its extras).
#   ./run.sh test [pytest args]      the test suite (what CI runs)
#   ./run.sh bench [bench args]      the main job: the benchmark report on this machine
# AKL_TORCH_SPEC overrides how torch is installed, e.g.
#   AKL_TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu" ./run.sh test
set -euo pipefail
cd "$(dirname "$0")"
VENV="${AKL_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  # On this project's machines torch==2.13.0 is the CPU wheel kept on local disk.
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install ${AKL_TORCH_SPEC:-torch==2.13.0}
fi
# The package is installed in editable mode, so only a changed pyproject.toml needs pip again.
stamp="$VENV/.akl_kernels-installed"
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$wanted" ]; then
  "$VENV/bin/python" -m pip install --quiet -e ".[test,bench,trl]"
  echo "$wanted" > "$stamp"
fi
command="${1:-}"
shift || true
case "$command" in
  # One pytest-xdist worker per core (pass -n 0 to run in this process, e.g. for --pdb).
  test) exec "$VENV/bin/python" -m pytest -n auto --dist worksteal "$@" ;;
  bench) exec "$VENV/bin/python" -m benchmarks "$@" ;;
  *) echo "usage: ./run.sh test|bench [args]" >&2; exit 2 ;;
esac
