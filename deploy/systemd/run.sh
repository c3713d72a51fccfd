#!/usr/bin/env bash
# The Debian package under systemd, end to end (run by .ci/run, as root): builds the package three
# times (this version, a higher one for the upgrade, and this version again: the same bytes, or
# the build is not reproducible; each build runs lintian), boots Debian 12 with systemd as PID 1 in a
# container, and runs deploy/systemd/checks.sh in it: apt install, start (Type=notify), the chain
# once per family, reload, kill -9, a real knock from a network namespace, upgrade with port 22
# probed throughout, stop, remove, purge, the journal. The container has no network (--network
# none; the client is a namespace inside it) and is removed on any exit.
#
# systemd as PID 1 runs here with --cgroupns=host, /sys/fs/cgroup bind-mounted read-write and
# tmpfs on /run and /run/lock; --privileged fails on this machine (CAP_SYS_RESOURCE is not in the
# host's bounding set), every other capability is given.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$(pwd)
IMAGE=nfknock-sd-systemd
NAME=nfknock-sd-$$

for pkg in docker.io debootstrap; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" && ! command -v "${pkg%.io}" >/dev/null; then
    echo "systemd: installing $pkg"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
  fi
done
. deploy/docker/dockerd.sh
start_dockerd /tmp/nfknock-sd-dockerd.log systemd
work=$(mktemp -d /tmp/nfknock-sd.XXXXXX)
cleanup() {
  docker rm -f "$NAME" >/dev/null 2>&1 || true
  rm -rf "$work"
  stop_dockerd
}
trap cleanup EXIT

# The kernel modules the daemon needs (the list the package installs in modules-load.d), and veth
# for the client: a container cannot load them.
for module in $(grep -v '^#' deploy/modules-load.d/nfknock.conf) veth; do
  modprobe -q "$module" 2>/dev/null || true
done

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' nfknock/__init__.py)
echo "systemd: building nfknock $version and $version+ci1 (the upgrade)"
DIST="$work/old" bash scripts/build-deb.sh | grep '^build-deb: /'
DIST="$work/new" DEB_VERSION="$version+ci1" bash scripts/build-deb.sh | grep '^build-deb: /'
# Reproducible: the same commit built again (another build directory, wheels built anew) gives
# the same .deb, byte for byte; else the files that differ are named.
DIST="$work/again" bash scripts/build-deb.sh | grep '^build-deb: /'
deb="nfknock_${version}_$(dpkg --print-architecture).deb"
first=$(sha256sum < "$work/old/$deb" | cut -d' ' -f1) again=$(sha256sum < "$work/again/$deb" | cut -d' ' -f1)
if [ "$first" != "$again" ]; then
  for build in old again; do
    mkdir -p "$work/x-$build/DEBIAN"
    dpkg-deb -x "$work/$build/$deb" "$work/x-$build"
    dpkg-deb -e "$work/$build/$deb" "$work/x-$build/DEBIAN"
    dpkg-deb -c "$work/$build/$deb" > "$work/x-$build.list"
  done
  diff -r -q "$work/x-old" "$work/x-again" >&2 || true
  diff "$work/x-old.list" "$work/x-again.list" | head -20 >&2 || true
  echo "systemd: FAIL: two builds of one commit differ: $deb $first vs $again" >&2
  exit 1
fi
echo "systemd: ok: two builds of one commit are the same .deb (sha256 $first)"

bash deploy/docker/base-image.sh
docker build -q -t "$IMAGE" -f deploy/systemd/Dockerfile deploy/systemd >/dev/null

docker run -d --name "$NAME" --hostname bastion --network none \
  --cgroupns=host -v /sys/fs/cgroup:/sys/fs/cgroup:rw --tmpfs /run --tmpfs /run/lock \
  --cap-add ALL --cap-drop SYS_RESOURCE --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
  --device-cgroup-rule 'a *:* rwm' \
  -v "$repo/deploy:/deploy:ro" -v "$work:/debs:ro" "$IMAGE" >/dev/null
state=
for _ in $(seq 60); do
  state=$(docker exec "$NAME" systemctl is-system-running 2>/dev/null || true)
  case "$state" in running|degraded) break ;; esac
  sleep 1
done
case "$state" in
  running) ;;
  degraded) echo "systemd: booted degraded: $(docker exec "$NAME" systemctl --failed --no-legend --plain | tr '\n' ';')" ;;
  *) docker logs "$NAME" 2>&1 | tail -30; echo "systemd: the container did not boot (state '$state')" >&2; exit 1 ;;
esac
echo "systemd: Debian 12 booted with $(docker exec "$NAME" readlink /proc/1/exe) as PID 1 ($state)"
docker exec "$NAME" bash /deploy/systemd/checks.sh \
  "/debs/old/nfknock_${version}_$(dpkg --print-architecture).deb" \
  "/debs/new/nfknock_${version}+ci1_$(dpkg --print-architecture).deb"
