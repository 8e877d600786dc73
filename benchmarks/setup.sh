#!/usr/bin/env bash
# Build the benchmark environment: benchmarks/.venv with this package (editable, with the
# collector and postgres extras), the frameworks and servers, and every peer from PyPI;
# plus wrk from Debian for the real-server scenario.
#
# Idempotent and quick on re-run: a stamp file keyed on a hash of requirements.txt, of
# this script and of the project's pyproject.toml skips the pip step when nothing changed.
# A peer that fails to install is skipped (the run then reports it as "n/a") instead of
# failing the whole setup, and the stamp is not written, so the next run tries again.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="$here/.venv"
py="${PYTHON:-python3}"
req="$here/requirements.txt"
stamp="$venv/.bench-stamp"
key="$(cat "$req" "${BASH_SOURCE[0]}" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"

if [[ ! -x "$venv/bin/python" ]]; then
    echo "setup: creating $venv"
    "$py" -m venv "$venv"
fi

if [[ -f "$stamp" && "$(cat "$stamp")" == "$key" ]] \
    && "$venv/bin/python" -c "import alf_analytics._version" 2>/dev/null; then
    echo "setup: benchmark environment up to date"
else
    pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
    "${pip[@]}" install -U pip >/dev/null
    echo "setup: installing alf-analytics (editable, with the collector's extras) and the frameworks"
    # The collector extras are for benchmarks/ingest.py; an extra this checkout does not
    # define yet is only warned about by pip.
    if ! "${pip[@]}" install -e "$root[collector,postgres]"; then
        echo "setup: WARNING: could not install alf-analytics from $root (reported as n/a)"
        ours_failed=1
    fi
    # Everything together first (one resolver pass); on failure, one by one so that a
    # single broken peer only removes itself.
    mapfile -t reqs < <(grep -Ev '^\s*(#|$)' "$req")
    if ! "${pip[@]}" install "${reqs[@]}" 2> >(grep -v "is ignored: it is neither" >&2); then
        echo "setup: joint install failed, installing one by one"
        for r in "${reqs[@]}"; do
            if ! "${pip[@]}" install "$r"; then
                echo "setup: WARNING: could not install $r (reported as n/a; retried next time)"
                failed=1
            fi
        done
    fi
    if [[ -z "${ours_failed:-}${failed:-}" ]]; then echo "$key" >"$stamp"; fi
fi

if ! command -v wrk >/dev/null 2>&1; then
    echo "setup: installing wrk"
    if ! apt-get install -y -q wrk >/dev/null 2>&1; then
        (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q wrk >/dev/null 2>&1) \
            || echo "setup: WARNING: wrk unavailable, run.py falls back to its Python load generator"
    fi
fi
echo "setup: done"
