#!/usr/bin/env bash
# Regenerates core/tests/fixtures/network/*/expected*/ by running cloud-init's own
# networkd renderer on each case (see README.md in the fixtures directory).
#
#   expected/          Debian bookworm cloud-init 22.4.2 (the package, unpacked)
#   expected-current/  upstream cloud-init release 26.2 (its cloudinit/ tree)
#
# Debian's python3 runs both, with cloud-init's Debian python dependencies.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cases="$repo/core/tests/fixtures/network"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/nixseed"
debian_dir="${NIXSEED_CLOUD_INIT_DEBIAN:-$cache/cloud-init-oracle}"
current_dir="${NIXSEED_CLOUD_INIT_CURRENT:-$cache/cloud-init-upstream}"
py=/usr/bin/python3
want_debian="22.4.2"

for pkg in python3-yaml python3-jinja2 python3-jsonschema python3-configobj \
    python3-jsonpatch python3-requests python3-netifaces; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="${missing:-} $pkg"
done
if [ -n "${missing:-}" ]; then
    echo "installing cloud-init's python dependencies:$missing" >&2
    apt-get install -y $missing >&2
fi

debian_site="$debian_dir/root/usr/lib/python3/dist-packages"
if [ ! -d "$debian_site/cloudinit" ]; then
    mkdir -p "$debian_dir"
    (cd "$debian_dir" && apt-get download cloud-init && dpkg -x cloud-init_*.deb root)
fi
got=$(PYTHONPATH="$debian_site" "$py" -c 'from cloudinit import version; print(version.version_string())')
case "$got" in
"$want_debian"*) ;;
*) echo "expected Debian cloud-init $want_debian in $debian_dir, found $got" >&2; exit 1 ;;
esac

have_current=1
if [ ! -d "$current_dir/cloudinit" ]; then
    have_current=0
    echo "no upstream cloud-init tree at $current_dir: expected-current/ is left as it is." >&2
    echo "  make one with: git -C <cloud-init clone> archive 26.2 cloudinit | tar -x -C $current_dir && echo 26.2 >$current_dir/VERSION" >&2
else
    # A release tree from `git archive` has no build-time version string; the
    # extraction step records the tag in VERSION.
    cur=$(cat "$current_dir/VERSION" 2>/dev/null || echo "upstream")
    echo "upstream cloud-init: $cur" >&2
fi

# render ORACLE_NAME SITE CASE_DIR OUT_SUBDIR: a rejected input leaves no OUT_SUBDIR
# and a `<OUT_SUBDIR>.rejected` file with cloud-init's last error line instead.
render() {
    local label=$1 site=$2 case_dir=$3 out=$4
    rm -rf "${case_dir:?}/$out" "$case_dir/$out.rejected"
    if ! PYTHONPATH="$site" "$py" "$here/render_with_cloud_init.py" \
        "$case_dir" "$case_dir/$out" 2>"$case_dir/.oracle-err"; then
        rm -rf "${case_dir:?}/$out"
        tail -n 1 "$case_dir/.oracle-err" >"$case_dir/$out.rejected"
        echo "$(basename "$case_dir"): cloud-init $label rejects it: $(cat "$case_dir/$out.rejected")" >&2
    fi
    rm -f "$case_dir/.oracle-err"
    # Keep an empty result (a disabled config) in git.
    if [ -d "$case_dir/$out" ] && [ -z "$(ls -A "$case_dir/$out")" ]; then
        touch "$case_dir/$out/.keep"
    fi
}

for case_dir in "$cases"/*/; do
    case_dir=${case_dir%/}
    [ -f "$case_dir/network-config" ] || [ -f "$case_dir/eni" ] ||
        [ -f "$case_dir/network_data.json" ] || continue
    render "$got" "$debian_site" "$case_dir" expected
    if [ "$have_current" = 1 ]; then
        render "$cur" "$current_dir" "$case_dir" expected-current
    fi
    echo "$(basename "$case_dir"): $(ls "$case_dir/expected" 2>/dev/null | wc -l) file(s) from $got" >&2
done
