#!/usr/bin/env bash
# Sets up everything mirrorfs needs on a Debian machine (as root), then runs a job:
#   bash examples/bootstrap.sh demo     the demo (examples/demo.py)
#   bash examples/bootstrap.sh test     the test suite
#   bash examples/bootstrap.sh bench [ARGS]   issue 8's I/O benchmark (bench/bench_io.py ARGS)
# System packages are installed with apt-get only when missing; Python packages go into
# .venv at the top of the checkout.
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"
job=${1:-demo}
shift || true

need=()
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
pkg-config --exists fuse3 2>/dev/null || need+=(libfuse3-dev)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v gcc >/dev/null 2>&1 || need+=(gcc)
command -v python3 >/dev/null 2>&1 || need+=(python3)
# The benchmark runs fio; so do tests of the write path (its libaio engine).
case "$job" in
    bench|test) command -v fio >/dev/null 2>&1 || need+=(fio) ;;
esac
if command -v python3 >/dev/null 2>&1; then
    python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
    inc=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    [ -f "$inc/Python.h" ] || need+=(python3-dev)
fi
if [ ${#need[@]} -gt 0 ]; then
    echo "bootstrap: installing system packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import pyfuse3, trio, lz4, sortedcontainers, rich, humanize, prometheus_client, shtab, pytest, hypothesis, trustme' 2>/dev/null; then
    echo "bootstrap: installing Python packages into .venv"
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/pip install -q -e '.[test]'
elif ! .venv/bin/python -c 'import mirrorfs' 2>/dev/null; then
    .venv/bin/pip install -q -e '.[test]'
fi

case "$job" in
    demo)
        exec .venv/bin/python examples/demo.py "$@"
        ;;
    test)
        .venv/bin/ruff check mirrorfs tests bench examples
        exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
        ;;
    bench)
        exec .venv/bin/python bench/bench_io.py "$@"
        ;;
    *)
        echo "usage: bash examples/bootstrap.sh demo|test|bench [ARGS]" >&2
        exit 2
        ;;
esac
