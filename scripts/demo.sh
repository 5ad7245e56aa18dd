#!/usr/bin/env bash
# The main job: sets up, starts the embedded stack (`nomad-pipeline dev`: the local
# Nomad-compatible agent plus the controller), applies manifests/examples and runs real flows on
# it, then stops the stack. Ports: NP_PORT (8080) and NP_NOMAD_PORT (4646); state is kept under
# .np-data/demo, so a second demo run sees the first one's runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
port="${NP_PORT:-8080}"
nomad_port="${NP_NOMAD_PORT:-4646}"
export NOMAD_PIPELINE_ADDR="http://127.0.0.1:${port}"

nomad-pipeline dev --data-dir .np-data/demo --port "$port" --nomad-port "$nomad_port" \
    > .np-data-demo.log 2>&1 &
stack=$!
trap 'kill -TERM "$stack" 2>/dev/null; wait "$stack" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    if python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=1)" \
        "$NOMAD_PIPELINE_ADDR/readyz" 2>/dev/null; then
        break
    fi
    kill -0 "$stack" 2>/dev/null || { cat .np-data-demo.log; exit 1; }
    sleep 0.2
done
echo "== controller at $NOMAD_PIPELINE_ADDR, Nomad API at http://127.0.0.1:${nomad_port}"

set -x
nomad-pipeline apply -f manifests/examples/
nomad-pipeline get flows -n examples
nomad-pipeline run sequential -n examples --var build_id=demo --wait
nomad-pipeline run inline -n examples --var target=nomad --follow
nomad-pipeline run dag -n examples --wait
nomad-pipeline get runs -n examples
