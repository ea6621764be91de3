#!/usr/bin/env bash
# make demo: the whole mission on a lab host.  Builds kengine, starts Docker,
# builds the lab image, brings up one lab host, and runs recipes/full.lua
# against it (Rancher is the API simulator there; see README "What runs for
# real").  Extra arguments go to `kengine run`, e.g. -e replicas=5.
set -euo pipefail
cd "$(dirname "$0")/.."
lab=${KENGINE_DEMO_LAB:-demo}

make -s kengine
tests/support/dockerd.sh >/dev/null
./kengine lab image
./kengine lab up 1 --name "$lab"
inv=$(./kengine lab inventory --name "$lab")
dir=$(dirname "$inv")

# secrets: generated once per lab, kept root-only beside the lab's key, and
# handed to kengine through its environment (never a command line)
secrets="$dir/demo-secrets.env"
if [ ! -f "$secrets" ]; then
  ( umask 077   # in a subshell: the rest of the run keeps the usual umask
    printf 'KENGINE_RANCHER_BOOTSTRAP_PASSWORD=%s\nKENGINE_RANCHER_ADMIN_PASSWORD=%s\n' \
      "$(openssl rand -hex 12)" "$(openssl rand -hex 16)" > "$secrets" )
fi
set -a; . "$secrets"; set +a

# the simulator's base image (Debian with python3): the lab image itself
if [ ! -f "$dir/lab-image.tar" ]; then docker save kengine-lab:bookworm -o "$dir/lab-image.tar"; fi

pub=$(cat "$dir/id_ed25519.pub")
cat > "$dir/demo-vars.json" <<JSON
{
  "admin_users": [ { "name": "deploy", "keys": [ "$pub" ] } ],
  "docker_storage_driver": "vfs",
  "rancher_sim": true,
  "rancher_sim_base": "$dir/lab-image.tar",
  "webservice_docker": true
}
JSON

status=0
./kengine run recipes/full.lua -i "$inv" -e "@$dir/demo-vars.json" "$@" || status=$?

http=$(sed -n 's/.*lab_http_port *= *\([0-9]*\).*/\1/p' "$inv" | head -1)
https=$(sed -n 's/.*lab_https_port *= *\([0-9]*\).*/\1/p' "$inv" | head -1)
cat <<EOT

Where to look:
  demo web service (docker backend, via nginx):  curl http://127.0.0.1:$http/   (repeat: the hostname changes)
  Rancher API (simulator) behind nginx TLS:      https://127.0.0.1:$https/ping
  a shell on the server:                         ./kengine lab ssh $lab-1 --name $lab
  re-run (zero changes) or scale:                make demo ARGS="-e replicas=5"
  remove the lab:                                ./kengine lab down --name $lab
EOT
exit $status
