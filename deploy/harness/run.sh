#!/usr/bin/env bash
# The container harness, end to end: base image (debootstrap when no registry is reachable),
# wheelhouse, images, then the scenario. Exits non-zero on any failure; cleans up always.
set -euo pipefail
cd "$(dirname "$0")/../.."
export COMPOSE_PROJECT_NAME=nfknockharness
bash scripts/setup.sh
missing=()
for pkg in docker.io docker-compose debootstrap; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "harness: installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
. deploy/docker/dockerd.sh
start_dockerd /tmp/nfknock-dockerd.log harness
modprobe -q nfnetlink_queue 2>/dev/null || true   # containers cannot load kernel modules
modprobe -q xt_NFQUEUE 2>/dev/null || true
modprobe -q nf_conntrack 2>/dev/null || true
bash deploy/docker/base-image.sh
rm -rf deploy/docker/wheels
# The dependencies exactly as the .deb has them (requirements/deb.lock, hashes checked), then nfknock.
.venv/bin/python -m pip wheel -q --disable-pip-version-check --require-hashes --no-deps \
  -r requirements/deb.lock -w deploy/docker/wheels >/dev/null
.venv/bin/python -m pip wheel -q --disable-pip-version-check --no-deps -w deploy/docker/wheels . >/dev/null
generated=deploy/harness/generated
rm -rf "$generated" && install -d -m 0700 "$generated" "$generated/rules"
(umask 077 && .venv/bin/nfknock keygen > "$generated/spa.keys")  # nfknock run trusts only 0600 key files
(umask 077 && .venv/bin/python -c 'import base64, secrets; print(base64.b64encode(secrets.token_bytes(48)).decode())' \
    > "$generated/fleet.key" \
  && .venv/bin/python -c 'import secrets; print(secrets.token_hex(16))' > "$generated/redis.password")
cp rules/ssh.yaml "$generated/rules/"
cat > "$generated/rules/spa.yaml" <<YAML
doors:
  - name: spaSSH
    kind: spa
    keys_file: /etc/nfknock/spa.keys
    protect: [22/tcp]
YAML
docker-compose build -q
cleanup() { docker-compose logs --no-color server server2 > /tmp/nfknock-harness-server.log 2>&1 || true
            docker-compose down -v --remove-orphans >/dev/null 2>&1 || true
            rm -rf "$generated"
            stop_dockerd; }
trap cleanup EXIT
docker-compose up -d redis server server2 >/dev/null
for member in server server2; do
  for _ in $(seq 60); do docker-compose logs "$member" 2>/dev/null | grep -q "reachable; sharing" && break; sleep 1; done
  docker-compose logs "$member" | grep -q "reachable; sharing" \
    || { docker-compose logs "$member"; echo "harness: $member not ready in the fleet" >&2; exit 1; }
done
docker-compose run --rm client
docker-compose run --rm attacker
log=$(docker-compose logs --no-color server)
echo "$log" | grep -q "172.31.199.20: openSSH: OPEN SESAME" || { echo "$log"; echo "harness: no OPEN SESAME for the client" >&2; exit 1; }
echo "$log" | grep -q "172.31.199.20: spaSSH: OPEN SESAME" || { echo "$log"; echo "harness: the SPA door did not open" >&2; exit 1; }
if echo "$log" | grep -q "172.31.199.30: openSSH: OPEN SESAME"; then echo "harness: the attacker opened the door" >&2; exit 1; fi
log2=$(docker-compose logs --no-color server2)
echo "$log2" | grep -q "172.31.199.20: openSSH: open, granted on fleet member one" \
  || { echo "$log2"; echo "harness: the knock's grant did not reach the second member" >&2; exit 1; }
echo "$log2" | grep -q "172.31.199.20: revoked on fleet member one" \
  || { echo "$log2"; echo "harness: the close sequence did not reach the second member" >&2; exit 1; }
echo "harness: all scenarios passed"
