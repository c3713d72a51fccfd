#!/usr/bin/env bash
# Builds dist/nfknock_<version>_<arch>.deb from this checkout (`make deb`); docs/packaging.md is
# the admin's guide. Build it on a build machine (Debian 12), not on the bastion, and copy the .deb.
#
# The package carries its own virtualenv in /opt/nfknock (netfilterqueue is not packaged by Debian
# and Debian's pydantic is 1.x), and the interpreter that venv runs on: a copy of Debian's
# python3.X and its standard library in /opt/nfknock/python. Why: a venv's compiled modules
# (netfilterqueue, pydantic_core, cffi) are built for one Python minor version, so a package that
# used Debian's python3 had to depend on `python3 (<< 3.X+1)`, and a release upgrade that moves
# python3 on lets apt remove nfknock to satisfy that. With its own interpreter the package has no
# python3 dependency at all, only on the C libraries the interpreter and modules link against
# (versioned by dpkg-shlibdeps, as a debhelper build does). It is made in a staging root and then
# moved to its final path: every text file that names the staging root is rewritten to /opt
# (shebangs, pyvenv.cfg), symlinks are re-pointed, the wheels' RECORD files are brought up to
# date, and the build fails if a binary file names it. No bytecode is shipped: postinst compiles it.
#
# Pinned and reproducible: the bundled Python distributions are exactly those of
# requirements/deb.lock (and the two sdists are built with requirements/build.lock), checked by
# sha256 (pip --require-hashes); SOURCE_DATE_EPOCH is the commit's time, every file's mtime is
# clamped to it, owners are root, archives are gzip -n/sorted, the build paths are random but
# never land in the package. Two builds of one commit give the same .deb, byte for byte
# (deploy/systemd/run.sh checks it in CI). Regenerate the locks with scripts/lock-deps.sh.
#
# DEB_VERSION=... overrides the version (default: nfknock.__version__); DIST=dir the output
# directory; PIP_* variables reach pip (e.g. PIP_FIND_LINKS for a wheelhouse);
# NFKNOCK_BUILD_DEPS=no skips the apt check of the build dependencies. lintian must report no
# error and no warning.
set -euo pipefail
umask 022
cd "$(dirname "$0")/.."
repo=$(pwd)

# The build dependencies, and nothing of the test toolchain (docs/packaging.md lists them).
BUILD_DEPENDS=(
  python3 python3-venv python3-dev gcc libc6-dev   # the carried interpreter; building the two sdists
  libnetfilter-queue-dev                           # NetfilterQueue links against it
  iptables                                         # libxtables/libip4tc: python-iptables loads them (import check)
  binutils                                         # strip, readelf
  dpkg-dev                                         # dpkg-shlibdeps: versioned library dependencies
  lintian                                          # the package is checked: no error, no warning
  git                                              # SOURCE_DATE_EPOCH and the file list of the commit
)
if [ "${NFKNOCK_BUILD_DEPS:-yes}" != no ]; then
  missing=()
  for pkg in "${BUILD_DEPENDS[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "build-deb: installing build dependencies: ${missing[*]}"
    [ "$(id -u)" -eq 0 ] || { echo "build-deb: need root to install: ${missing[*]}" >&2; exit 1; }
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

PYTHON=/usr/bin/python3   # Debian's interpreter: copied into the package
version=${DEB_VERSION:-$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' nfknock/__init__.py)}
[ -n "$version" ] || { echo "build-deb: no version in nfknock/__init__.py" >&2; exit 1; }
arch=$(dpkg --print-architecture)
pyver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
dist=${DIST:-$repo/dist}
deb="$dist/nfknock_${version}_${arch}.deb"
maintainer=${DEB_MAINTAINER:-"nfknock authors <maintainers@nfknock.invalid>"}
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || true)
  [ -n "$SOURCE_DATE_EPOCH" ] || { SOURCE_DATE_EPOCH=$(date +%s); echo "build-deb: no git commit: the build time is used (not reproducible)"; }
fi
export SOURCE_DATE_EPOCH   # dpkg-deb's ar member times; tar and gzip below
export PYTHONDONTWRITEBYTECODE=1 PYTHONHASHSEED=0 LC_ALL=C.UTF-8 TZ=UTC
export PIP_DISABLE_PIP_VERSION_CHECK=1

work=$(mktemp -d /tmp/nfknock-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
root="$work/root"
venv="$root/opt/nfknock"
pyhome="$venv/python"   # the interpreter the venv runs on (its `home`)

# The sources of this commit (tracked files, as in the work tree): no build/, egg-info or
# __pycache__ left in the checkout by earlier builds can reach the wheel.
src="$work/src"
mkdir -p "$src"
if git rev-parse --git-dir >/dev/null 2>&1; then
  git ls-files -z -- nfknock setup.cfg pyproject.toml README.md | xargs -0 cp --parents -t "$src"
else
  cp -r --parents nfknock setup.cfg pyproject.toml README.md "$src"
  find "$src" -name __pycache__ -type d -prune -exec rm -rf {} +
fi

echo "build-deb: python $pyver carried in /opt/nfknock/python"
install -d "$pyhome/bin" "$pyhome/lib"
cp -L "$(readlink -f "$PYTHON")" "$pyhome/bin/python$pyver"
ln -s "python$pyver" "$pyhome/bin/python3"
# The standard library without what a daemon never imports (tests, IDLE, Tk, build files, ensurepip)
# and without compiled modules for terminals, dbm and NIS (fewer libraries to depend on; pyroute2
# needs sqlite3).
tar -C /usr/lib -c --exclude=__pycache__ --exclude="python$pyver/test" --exclude="python$pyver/idlelib" \
    --exclude="python$pyver/tkinter" --exclude="python$pyver/turtledemo" --exclude="python$pyver/lib2to3" \
    --exclude="python$pyver/config-*" --exclude="python$pyver/dist-packages" --exclude="python$pyver/site-packages" \
    --exclude="python$pyver/ensurepip" --exclude="python$pyver/sitecustomize.py" \
    --exclude='_test*' --exclude='_ctypes_test*' --exclude='xxlimited*' --exclude='_xx*' --exclude='_curses*' \
    --exclude='readline.*' --exclude='_dbm.*' --exclude='_gdbm.*' --exclude='nis.*' \
    --exclude='_tkinter*' --exclude='ossaudiodev.*' --exclude='audioop.*' "python$pyver" | tar -C "$pyhome/lib" -x
"$pyhome/bin/python$pyver" -c 'import sys; assert sys.base_prefix.endswith("/opt/nfknock/python"), sys.base_prefix'

echo "build-deb: wheels from requirements/deb.lock (hashes checked)"
# A build environment of its own: Debian's pip, then the pinned build tools; the sdists are
# built without isolation (so with those pinned tools) and without pip's wheel cache (so never
# with a wheel an earlier, unpinned build left there).
"$PYTHON" -m venv "$work/build"
bpip=("$work/build/bin/python" -m pip -q)
"${bpip[@]}" install --require-hashes --no-deps -r requirements/build.lock
"${bpip[@]}" download --require-hashes --no-deps -r requirements/deb.lock -d "$work/downloads"
# The compiled modules must not depend on where pip unpacked the sdist (a random directory, here
# under $work, which the package is checked not to name): no debug information (strip removes it
# anyway, but the build id is a hash over it) and no build path in __FILE__.
mkdir -p "$work/tmp"
TMPDIR="$work/tmp" CFLAGS="-g0 -ffile-prefix-map=$work=." \
  "${bpip[@]}" wheel --no-cache-dir --no-index --find-links "$work/downloads" --no-build-isolation --no-deps \
  --require-hashes -r requirements/deb.lock -w "$work/wheels"
"${bpip[@]}" wheel --no-cache-dir --no-index --no-build-isolation --no-deps "$src" -w "$work/wheels"

echo "build-deb: virtualenv for python $pyver"
"$pyhome/bin/python$pyver" -m venv --without-pip "$venv"
"${bpip[@]}" --python "$venv/bin/python" install --no-index --no-deps --no-compile "$work/wheels"/*.whl
"${bpip[@]}" --python "$venv/bin/python" check   # every requirement of every distribution is met
site="$venv/lib/python$pyver/site-packages"
# Only what nfknock runs: its command and the interpreter links; no activate scripts, no other
# distributions' commands (pyroute2's ss2, dhcp-server-detector, ...).
find "$venv/bin" -mindepth 1 -maxdepth 1 ! -name nfknock ! -name python ! -name python3 ! -name "python$pyver" -exec rm -f {} +
rm -f "$site"/*.dist-info/direct_url.json   # names the build directory
find "$venv" -name __pycache__ -type d -prune -exec rm -rf {} +
rmdir "$venv/include/python$pyver" "$venv/include" 2>/dev/null || true
# Modules are imported, never run: none is executable (a few wheels ship some so).
find "$pyhome/lib" "$site" -name '*.py' -type f -perm /111 -exec chmod a-x {} +
# ... so their shebang lines go (left blank: a traceback's line numbers stay right).
find "$pyhome/lib" "$site" -name '*.py' -type f -exec grep -l --null -m1 '^#!' {} + | xargs -0 -r sed -i '1s/^#!.*$//'
# Compiled modules stripped as dh_strip would (smaller; no build paths, no build ids), then imported once.
find "$venv" -name '*.so*' -type f -exec strip --strip-unneeded --remove-section=.comment --remove-section=.note {} +
"$venv/bin/python" -c 'import netfilterqueue, iptc, yaml, _cffi_backend, pydantic_core, prometheus_client, redis
import cryptography.hazmat.bindings._rust, nfknock.cli, pyroute2, sqlite3, ssl, ctypes'
find "$venv" -name __pycache__ -type d -prune -exec rm -rf {} +

echo "build-deb: the man page, from the CLI's parser"
install -d "$root/usr/share/man/man8"
"$venv/bin/python" -m nfknock.tools.manpage --date "$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%d)" \
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
leftover=$(grep -rl --fixed-strings -e "$root" -e "$work" "$root" || true)
[ -z "$leftover" ] || { echo "build-deb: files name the build directory: $leftover" >&2; exit 1; }
case "$(head -n1 "$venv/bin/nfknock")" in
  "#!/opt/nfknock/bin/python"|"#!/opt/nfknock/bin/python3") ;;
  *) echo "build-deb: unexpected shebang in bin/nfknock: $(head -n1 "$venv/bin/nfknock")" >&2; exit 1 ;;
esac
# The wheels' RECORD files as the files now are (pip uninstall and `pip check` read them): rewritten
# files get their new hash, removed ones leave.
"$venv/bin/python" - "$site" <<'PY'
import base64, csv, hashlib, io, pathlib, sys

site = pathlib.Path(sys.argv[1])
for record in sorted(site.glob("*.dist-info/RECORD")):
    rows = []
    for row in csv.reader(record.read_text().splitlines()):
        path = (site / row[0]).resolve() if not row[0].startswith("/") else pathlib.Path(row[0])
        if row[0] == f"{record.parent.name}/RECORD":
            rows.append([row[0], "", ""])
        elif path.is_file():
            data = path.read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append([row[0], f"sha256={digest}", str(len(data))])
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    record.write_text(out.getvalue())
PY

echo "build-deb: files"
install -d "$root/usr/bin" "$root/lib/systemd/system" "$root/etc/default" "$root/usr/share/doc/nfknock/examples" \
  "$root/usr/share/lintian/overrides"
ln -s /opt/nfknock/bin/nfknock "$root/usr/bin/nfknock"
sed 's|/usr/local/bin/nfknock|/usr/bin/nfknock|g' deploy/nfknock.service > "$root/lib/systemd/system/nfknock.service"
grep -q '^ExecStart=.*/usr/bin/nfknock run' "$root/lib/systemd/system/nfknock.service" \
  || { echo "build-deb: the unit does not run /usr/bin/nfknock" >&2; exit 1; }
chmod 0644 "$root/lib/systemd/system/nfknock.service"
install -m 0644 deploy/nfknock.default "$root/etc/default/nfknock"
install -d -m 0700 "$root/etc/nfknock" "$root/etc/nfknock/rules"
{ printf '%s\n' \
    "# DISABLED EXAMPLE: nfknock reads only *.yaml. Set a sequence of your own (everyone has read" \
    "# this one), then: cp ssh.yaml.example ssh.yaml; nfknock check; systemctl start nfknock"
  cat rules/ssh.yaml; } > "$root/etc/nfknock/rules/ssh.yaml.example"
chmod 0600 "$root/etc/nfknock/rules/ssh.yaml.example"
install -d -m 0755 "$root/usr/share/doc/nfknock/docs"
for doc in README.md SECURITY.md docs/*.md; do   # docs/ kept as a folder: README links to docs/X.md
  [ -f "$doc" ] && gzip -9n < "$doc" > "$root/usr/share/doc/nfknock/$doc.gz"
done
for example in deploy/monitoring/*; do
  [ -f "$example" ] && install -m 0644 "$example" "$root/usr/share/doc/nfknock/examples/"
done
# Files for other tools, each where its Debian package looks, when the checkout has them:
# deploy/DIR/PATH -> TARGET/PATH (modes kept: logwatch's service scripts are executable).
install_tree() {   # install_tree DIR TARGET
  [ -d "$1" ] || return 0
  while IFS= read -r -d '' file; do
    mode=0644; [ -x "$file" ] && mode=0755
    install -D -m "$mode" "$file" "$root$2/${file#"$1"/}"
  done < <(find "$1" -type f -print0 | sort -z)
}
install_tree deploy/modules-load.d /usr/lib/modules-load.d   # the modules the daemon needs, loaded at boot
install_tree deploy/logrotate /etc/logrotate.d
install_tree deploy/logcheck /etc/logcheck                   # ignore.d.server/nfknock, ...
install_tree deploy/fail2ban /etc/fail2ban                   # filter.d/nfknock.conf, jail.d/nfknock.conf
install_tree deploy/logwatch/conf /usr/share/logwatch/default.conf   # services/, logfiles/
install_tree deploy/logwatch/default.conf /usr/share/logwatch/default.conf
install_tree deploy/logwatch/scripts /usr/share/logwatch/scripts
# The Debian changelog, made from CHANGELOG.md (a native package: changelog.gz).
"$venv/bin/python" - CHANGELOG.md "$version" "$maintainer" "$SOURCE_DATE_EPOCH" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  <<'PY' | gzip -9n > "$root/usr/share/doc/nfknock/changelog.gz"
import email.utils, re, sys, textwrap
from datetime import datetime, timezone

changelog, version, maintainer, epoch, commit = sys.argv[1:]
entries = []   # (version, date, [items])
for line in open(changelog, encoding="utf-8"):
    heading = re.match(r"^## (\S+) \((\d{4}-\d{2}-\d{2})\)", line)
    if heading:
        entries.append((heading[1], heading[2], []))
    elif entries and line.startswith("- "):
        entries[-1][2].append(line[2:].strip())
    elif entries and entries[-1][2] and line.startswith("  ") and line.strip():
        entries[-1][2][-1] += " " + line.strip()
if not entries:
    sys.exit("build-deb: no '## VERSION (YYYY-MM-DD)' section in CHANGELOG.md")
built = datetime.fromtimestamp(int(epoch), timezone.utc)
if entries[0][0] != version:   # DEB_VERSION: a rebuild of the newest version
    entries.insert(0, (version, built.strftime("%Y-%m-%d"), [f"Rebuild of {entries[0][0]} (git {commit})."]))
for number, (ver, day, items) in enumerate(entries):
    when = built if number == 0 else datetime.strptime(day, "%Y-%m-%d").replace(hour=12, tzinfo=timezone.utc)
    print(f"nfknock ({ver}) unstable; urgency=medium\n")
    for item in items or ["Release."]:
        print(textwrap.fill(item, 78, initial_indent="  * ", subsequent_indent="    ", break_on_hyphens=False))
    print(f"\n -- {maintainer}  {email.utils.format_datetime(when)}\n")
PY
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
# Versioned dependencies on the libraries the interpreter and the compiled modules link against,
# as dh_shlibdeps finds them (from the libraries' symbols/shlibs files); the ones a wheel bundles
# (its .libs directory) are the package's own.
mkdir -p "$work/shlibdeps/debian"
printf 'Source: nfknock\n\nPackage: nfknock\nArchitecture: any\n' > "$work/shlibdeps/debian/control"
mapfile -d '' elves < <(find "$venv" \( -name '*.so*' -o -path "$pyhome/bin/python$pyver" \) -type f -print0 | sort -z)
private=$(find "$venv" -type d -name '*.libs' -printf '-l%p\n' | sort)
# shellcheck disable=SC2086 # one -l option per directory
shlibs=$(cd "$work/shlibdeps" && dpkg-shlibdeps -O --ignore-missing-info $private "${elves[@]}" 2>"$work/shlibdeps.log" \
  | sed -n 's/^shlibs:Depends=//p') || { cat "$work/shlibdeps.log" >&2; exit 1; }
[ -n "$shlibs" ] || { cat "$work/shlibdeps.log" >&2; echo "build-deb: dpkg-shlibdeps found no dependency" >&2; exit 1; }
# python-iptables loads libxtables and libip4tc/libip6tc with ctypes (no ELF link to see): the
# minimum versions their own shlibs files give.
dlopened=
for pkg in libxtables12 libip4tc2 libip6tc2; do
  file=$(dpkg-query --control-path "$pkg" shlibs 2>/dev/null || true)
  dep=$([ -n "$file" ] && awk '!/^#/ && NF >= 3 {$1 = ""; $2 = ""; sub(/^ +/, ""); print; exit}' "$file")
  dlopened="$dlopened, ${dep:-$pkg}"
done
# The tools the firewall backends and the granted set run, then the libraries.
depends="iptables, ipset$dlopened, $shlibs"
install -d "$root/DEBIAN"
install -m 0755 deploy/debian/postinst deploy/debian/prerm deploy/debian/postrm "$root/DEBIAN/"
(cd "$root" && find etc -type f | sort | sed 's|^|/|') > "$root/DEBIAN/conffiles"
# Installed-Size as dpkg-gencontrol counts it: KiB per file, rounded up, and 1 per other entry.
size=$(find "$root" -path "$root/DEBIAN" -prune -o -mindepth 1 -printf '%y %s\n' \
  | awk '$1 == "f" {n += int(($2 + 1023) / 1024); next} {n += 1} END {print n}')
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
# Every mtime is the commit's (dpkg-deb sorts the entries and writes the ar times from SOURCE_DATE_EPOCH).
find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

mkdir -p "$dist"
# One compressor thread: xz's output does not then depend on the build machine's cores.
dpkg-deb --root-owner-group --threads-max=1 -Zxz --build "$root" "$deb" >/dev/null
echo "build-deb: $deb ($(du -h "$deb" | cut -f1), sha256 $(sha256sum "$deb" | cut -c1-16)); Depends: $depends"
# No error and no warning (overrides in deploy/debian/lintian-overrides each say why).
lintian --fail-on error,warning "$deb" >"$work/lintian.log" 2>&1 || status=$?
if [ "${status:-0}" -ne 0 ]; then
  grep -v "^running with root privileges" "$work/lintian.log" >&2 || true
  echo "build-deb: lintian reports errors or warnings (above)" >&2
  exit 1
fi
echo "build-deb: lintian reports no error and no warning"
