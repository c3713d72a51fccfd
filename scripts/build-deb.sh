#!/usr/bin/env bash
# Builds dist/nfknock_<version>_<arch>.deb from this checkout (`make deb`).
#
# The package carries its own virtualenv in /opt/nfknock (netfilterqueue is not packaged by Debian
# and Debian's pydantic is 1.x), and the interpreter that venv runs on: a copy of Debian's
# python3.X and its standard library in /opt/nfknock/python. Why: a venv's compiled modules
# (netfilterqueue, pydantic_core, cffi) are built for one Python minor version, so a package that
# used Debian's python3 had to depend on `python3 (<< 3.X+1)`, and a release upgrade that moves
# python3 on lets apt remove nfknock to satisfy that. With its own interpreter the package has no
# python3 dependency at all, only on the C libraries the interpreter and modules link against
# (found below, as dh_shlibdeps would). It is made in a staging root and then moved to its final
# path: every text file that names the staging root is rewritten to /opt (shebangs, activate
# scripts, pyvenv.cfg), symlinks are re-pointed, and the build fails if a binary file names it.
# No bytecode is shipped: postinst compiles it.
#
# DEB_VERSION=... overrides the version (default: nfknock.__version__); DIST=dir the output
# directory; PIP_* variables reach pip (e.g. PIP_FIND_LINKS for a wheelhouse). lintian, when
# installed, must report no error.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
bash scripts/setup.sh   # gcc, python3-dev, libnetfilter-queue-dev (to build netfilterqueue), lintian, make

PYTHON=/usr/bin/python3   # Debian's interpreter: copied into the package
version=${DEB_VERSION:-$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' nfknock/__init__.py)}
[ -n "$version" ] || { echo "build-deb: no version in nfknock/__init__.py" >&2; exit 1; }
arch=$(dpkg --print-architecture)
pyver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
dist=${DIST:-$repo/dist}
deb="$dist/nfknock_${version}_${arch}.deb"
maintainer=${DEB_MAINTAINER:-$(git log -1 --format='%an <%ae>' 2>/dev/null || true)}
[ -n "$maintainer" ] || maintainer="nfknock maintainers <maintainers@nfknock.invalid>"

work=$(mktemp -d /tmp/nfknock-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
root="$work/root"
venv="$root/opt/nfknock"
pyhome="$venv/python"   # the interpreter the venv runs on (its `home`)

echo "build-deb: python $pyver carried in /opt/nfknock/python"
install -d "$pyhome/bin" "$pyhome/lib"
cp -L "$(readlink -f "$PYTHON")" "$pyhome/bin/python$pyver"
ln -s "python$pyver" "$pyhome/bin/python3"
# The standard library without what a daemon never imports (tests, IDLE, Tk, build files) and
# without compiled modules for terminals, dbm and NIS (fewer libraries to depend on; pyroute2 needs sqlite3).
tar -C /usr/lib -c --exclude=__pycache__ --exclude="python$pyver/test" --exclude="python$pyver/idlelib" \
    --exclude="python$pyver/tkinter" --exclude="python$pyver/turtledemo" --exclude="python$pyver/lib2to3" \
    --exclude="python$pyver/config-*" --exclude="python$pyver/dist-packages" --exclude="python$pyver/site-packages" \
    --exclude='_test*' --exclude='_ctypes_test*' --exclude='xxlimited*' --exclude='_xx*' --exclude='_curses*' \
    --exclude='readline.*' --exclude='_dbm.*' --exclude='_gdbm.*' --exclude='nis.*' \
    --exclude='_tkinter*' --exclude='ossaudiodev.*' --exclude='audioop.*' "python$pyver" | tar -C "$pyhome/lib" -x
find "$pyhome/lib" -name '*.py' -type f -perm /111 -exec chmod a-x {} +   # modules, imported, never run
"$pyhome/bin/python$pyver" -c 'import sys; assert sys.base_prefix.endswith("/opt/nfknock/python"), sys.base_prefix'
echo "build-deb: virtualenv for python $pyver"
"$pyhome/bin/python$pyver" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-compile "$repo[server,metrics,fleet]"
"$venv/bin/python" -m pip uninstall -q -y pip setuptools   # not needed at run time
rm -rf "$pyhome/lib/python$pyver/ensurepip"   # made the venv; not needed at run time
rm -rf "$repo/build" "$repo"/*.egg-info
find "$venv" -name __pycache__ -type d -prune -exec rm -rf {} +
rmdir "$venv/include/python$pyver" "$venv/include" 2>/dev/null || true
# Compiled modules stripped as dh_strip would (smaller; no build paths), then imported once.
find "$venv" -name '*.so' -type f -exec strip --strip-unneeded --remove-section=.comment --remove-section=.note {} +
"$venv/bin/python" -c 'import netfilterqueue, iptc, yaml, _cffi_backend, pydantic_core, prometheus_client
import cryptography.hazmat.bindings._rust, nfknock.cli, pyroute2, sqlite3, ssl, ctypes'

echo "build-deb: the man page, from the CLI's parser"
install -d "$root/usr/share/man/man8"
"$venv/bin/python" -m nfknock.tools.manpage --date "$(date -u -d "@${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}" +%Y-%m-%d)" \
  | gzip -9n > "$root/usr/share/man/man8/nfknock.8.gz"

# Third-party licences, read from the installed distributions, for the copyright file.
licences=$("$venv/bin/python" - <<'PY'
from importlib.metadata import distributions
for dist in sorted(distributions(), key=lambda d: d.metadata["Name"].lower()):
    meta = dist.metadata
    if meta["Name"] == "nfknock":
        continue
    licence = meta.get("License-Expression") or meta.get("License") or ""
    if not licence or len(licence) > 60 or "\n" in licence:
        classifiers = [c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
        licence = " or ".join(classifiers) or "see its metadata"
    print(f"{meta['Name']} {meta['Version']}: {licence}")
PY
)

echo "build-deb: moving the staging root to /opt/nfknock"
while IFS= read -r -d '' file; do
  sed -i "s|$root||g" "$file"
done < <(grep -rlIZ --fixed-strings "$root" "$root" || true)
while IFS= read -r -d '' link; do
  target=$(readlink "$link")
  case "$target" in "$root"/*) ln -sfnr "$target" "$link" ;; esac   # relative: it stays inside the package
done < <(find "$root" -type l -print0)
leftover=$(grep -rl --fixed-strings "$root" "$root" || true)
[ -z "$leftover" ] || { echo "build-deb: binary files name the staging root: $leftover" >&2; exit 1; }
case "$(head -n1 "$venv/bin/nfknock")" in
  "#!/opt/nfknock/bin/python"|"#!/opt/nfknock/bin/python3") ;;
  *) echo "build-deb: unexpected shebang in bin/nfknock: $(head -n1 "$venv/bin/nfknock")" >&2; exit 1 ;;
esac

echo "build-deb: files"
install -d "$root/usr/bin" "$root/lib/systemd/system" "$root/etc/default" "$root/usr/share/doc/nfknock/examples" \
  "$root/usr/share/lintian/overrides"
ln -s /opt/nfknock/bin/nfknock "$root/usr/bin/nfknock"
sed 's|/usr/local/bin/nfknock|/usr/bin/nfknock|g' deploy/nfknock.service > "$root/lib/systemd/system/nfknock.service"
grep -q 'exec /usr/bin/nfknock run' "$root/lib/systemd/system/nfknock.service" \
  || { echo "build-deb: the unit does not run /usr/bin/nfknock" >&2; exit 1; }
chmod 0644 "$root/lib/systemd/system/nfknock.service"
install -D -m 0644 deploy/modules-load.d/nfknock.conf "$root/usr/lib/modules-load.d/nfknock.conf"  # the unit has no CAP_SYS_MODULE
install -m 0644 deploy/nfknock.default "$root/etc/default/nfknock"
install -d -m 0700 "$root/etc/nfknock" "$root/etc/nfknock/rules"
{ printf '%s\n' \
    "# DISABLED EXAMPLE: nfknock reads only *.yaml. Set a sequence of your own (everyone has read" \
    "# this one), then: cp ssh.yaml.example ssh.yaml; nfknock check; systemctl start nfknock"
  cat rules/ssh.yaml; } > "$root/etc/nfknock/rules/ssh.yaml.example"
chmod 0600 "$root/etc/nfknock/rules/ssh.yaml.example"
gzip -9n < README.md > "$root/usr/share/doc/nfknock/README.md.gz"
for example in deploy/monitoring/*; do
  [ -f "$example" ] && install -m 0644 "$example" "$root/usr/share/doc/nfknock/examples/"
done
{ echo "nfknock ($version) unstable; urgency=medium"
  echo
  echo "  * Package built from the nfknock checkout (git $(git rev-parse --short HEAD 2>/dev/null || echo unknown))."
  echo
  echo " -- $maintainer  $(date -R -u -d "@${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")"
} | gzip -9n > "$root/usr/share/doc/nfknock/changelog.gz"
third_party=$(echo "Files: opt/nfknock/lib/*"
  echo "Copyright: the authors of each distribution"
  echo "License: various"
  echo " The virtualenv in /opt/nfknock holds these Python distributions, each under its"
  echo " own licence (its text is in the distribution's *.dist-info directory):"
  echo "$licences" | sed 's/^/  /')
awk -v block="$third_party" '$0 == "@THIRD_PARTY@" {print block; next} {print}' deploy/debian/copyright \
  > "$root/usr/share/doc/nfknock/copyright"
install -m 0644 deploy/debian/lintian-overrides "$root/usr/share/lintian/overrides/nfknock"

echo "build-deb: control"
# Libraries the compiled modules link against, owned by Debian packages (not by the venv).
shlibs=$(find "$venv" \( -name '*.so*' -o -path "$pyhome/bin/python$pyver" \) -type f -exec readelf -d {} + 2>/dev/null \
  | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | sort -u)
libdeps=()
cache=$(ldconfig -p)
for lib in $shlibs; do
  path=$(awk -v l="$lib" '$1 == l {print $NF}' <<<"$cache" | head -n1)
  [ -n "$path" ] || continue   # bundled in the venv (a wheel's .libs) or not found: not a Debian dependency
  owner=$( (dpkg -S "$(readlink -f "$path")" 2>/dev/null || dpkg -S "$path" 2>/dev/null || true) | head -n1)
  [ -n "$owner" ] && libdeps+=("${owner%%:*}")
done
# No python3: the package carries its interpreter (above). The tools the firewall backends and
# the granted set run, and the libraries above (the interpreter's and the compiled modules').
depends="iptables, ipset"
for pkg in $(printf '%s\n' libnetfilter-queue1 "${libdeps[@]}" | sort -u); do depends="$depends, $pkg"; done
install -d "$root/DEBIAN"
install -m 0755 deploy/debian/postinst deploy/debian/prerm deploy/debian/postrm "$root/DEBIAN/"
printf '%s\n' /etc/default/nfknock /etc/nfknock/rules/ssh.yaml.example > "$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: nfknock
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $size
Depends: $depends
Recommends: kmod
Suggests: knockd, fwknop-client
Section: net
Priority: optional
Description: inline NFQUEUE port-knocking daemon for bastion hosts
 nfknock keeps SSH (or any TCP/UDP service) closed until a client knocks a
 secret sequence of closed ports or sends an fwknop-compatible SPA packet.
 The kernel sends knock packets and new connections to protected ports to an
 NFQUEUE, and nfknock decides on each as it passes: no per-client firewall
 rule is ever written, and with no daemon running the protected ports stay
 closed.
 .
 The daemon runs from a self-contained virtualenv in /opt/nfknock under
 systemd; the example door in /etc/nfknock/rules ships disabled.
CONTROL
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) > "$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/md5sums" "$root/DEBIAN/control" "$root/DEBIAN/conffiles"

mkdir -p "$dist"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "build-deb: $deb ($(du -h "$deb" | cut -f1)); Depends: $depends"
if command -v lintian >/dev/null; then
  lintian --fail-on error "$deb" 2>&1 | grep -v "^running with root privileges" || true
  lintian --fail-on error "$deb" >/dev/null 2>&1 || { echo "build-deb: lintian reports errors (above)" >&2; exit 1; }
  echo "build-deb: lintian reports no error"
fi
