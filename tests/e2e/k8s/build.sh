#!/usr/bin/env bash
# Builds the real Kubernetes parts the end-to-end harness runs (src/testbed/mod.rs),
# from the Go module proxy, at the versions pinned in the go.mod files beside this script.
#
#   tests/e2e/k8s/build.sh [NAME...]    NAME: kube-apiserver etcd metrics-server sample-apiserver kubectl
#
# With no NAME it builds the four the harness always needs (kubectl only on request: the
# harness asks for it when the machine has none). Each binary lands in
#   ${KAP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kube-aggregation-proxy}/bin/<name>-<version>
# and is skipped when already there, so a second run costs no Go invocation at all.
# Builds run one at a time (a kube-apiserver build alone fills two cores) and each is written
# under a temporary name and renamed, so an interrupted build never leaves a binary behind.
#
# stdout: one line per binary, "<name> <absolute path>"; progress goes to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_dir="${KAP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kube-aggregation-proxy}"
bin_dir="$cache_dir/bin"

go_bin="${GO:-}"
if [[ -z "$go_bin" ]]; then
	if command -v go >/dev/null 2>&1; then
		go_bin="$(command -v go)"
	elif [[ -x /usr/local/go/bin/go ]]; then
		go_bin=/usr/local/go/bin/go
	else
		echo "build.sh: no Go toolchain found (set GO=/path/to/go)" >&2
		exit 1
	fi
fi

# name -> "<module dir> <module whose version keys the cache> <package to build>"
declare -A targets=(
	[kube-apiserver]="apiserver k8s.io/kubernetes k8s.io/kubernetes/cmd/kube-apiserver"
	[sample-apiserver]="apiserver k8s.io/sample-apiserver k8s.io/sample-apiserver"
	[kubectl]="apiserver k8s.io/kubernetes k8s.io/kubernetes/cmd/kubectl"
	[etcd]="etcd go.etcd.io/etcd/server/v3 ."
	[metrics-server]="metrics-server sigs.k8s.io/metrics-server sigs.k8s.io/metrics-server/cmd/metrics-server"
)

# The pinned version of a module, read from the `require` lines of a go.mod without running Go.
pinned_version() {
	local gomod="$1" module="$2" version
	version="$(awk -v m="$module" '
		$1 == "require" && $2 == m { print $3; exit }
		$1 == m && $2 ~ /^v/ { print $2; exit }
	' "$gomod")"
	if [[ -z "$version" ]]; then
		echo "build.sh: $module is not required by $gomod" >&2
		exit 1
	fi
	printf '%s\n' "$version"
}

# The version stamp Kubernetes' release build (hack/lib/version.sh) gives a binary, so
# `kube-apiserver --version`, `/version` and `kubectl version` report the release instead of
# v0.0.0-master: gitVersion, gitMajor, gitMinor, gitTreeState and buildDate, in
# k8s.io/component-base/version and k8s.io/client-go/pkg/version. The release commit is not
# known from the module proxy, so gitCommit stays empty; buildDate is the release's own time
# (the module's), so a build is reproducible. etcd's version is a constant in its source.
# Bump RECIPE when this changes, so binaries built the old way are built again.
RECIPE=r2
version_ldflags() {
	local name="$1" dir="$2" version="$3" stamp="$3" module="$4"
	case "$name" in
	kube-apiserver | kubectl | sample-apiserver)
		# Built from the Kubernetes release these modules are staged from.
		stamp="$(pinned_version "$here/$dir/go.mod" k8s.io/kubernetes)"
		module=k8s.io/kubernetes
		;;
	metrics-server) ;;
	*) return 0 ;;
	esac
	local info time major minor rest
	info="$(cd "$here/$dir" && "$go_bin" mod download -json "$module@$stamp" | awk -F'"' '$2 == "Info" { print $4 }')"
	time="$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$info")"
	rest="${stamp#v}"
	major="${rest%%.*}"
	rest="${rest#*.}"
	minor="${rest%%.*}"
	local pkg
	for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		printf ' -X %s.gitVersion=%s -X %s.gitMajor=%s -X %s.gitMinor=%s -X %s.gitCommit= -X %s.gitTreeState=clean -X %s.buildDate=%s' \
			"$pkg" "$stamp" "$pkg" "$major" "$pkg" "$minor" "$pkg" "$pkg" "$pkg" "$time"
	done
}

names=("$@")
if [[ ${#names[@]} -eq 0 ]]; then
	names=(etcd kube-apiserver sample-apiserver metrics-server)
fi

mkdir -p "$bin_dir"
step=0
for name in "${names[@]}"; do
	step=$((step + 1))
	spec="${targets[$name]:-}"
	if [[ -z "$spec" ]]; then
		echo "build.sh: unknown binary '$name' (known: ${!targets[*]})" >&2
		exit 2
	fi
	read -r dir module package <<<"$spec"
	version="$(pinned_version "$here/$dir/go.mod" "$module")"
	out="$bin_dir/$name-$version-$RECIPE"
	if [[ ! -x "$out" ]]; then
		echo "build.sh: [$step/${#names[@]}] building $name $version (module $module) ..." >&2
		start=$SECONDS
		tmp="$out.tmp.$$"
		trap 'rm -f "$tmp"' EXIT
		(
			cd "$here/$dir"
			CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" \
				"$go_bin" build -trimpath -ldflags="-s -w$(version_ldflags "$name" "$dir" "$version" "$module")" -o "$tmp" "$package"
		)
		mv -f "$tmp" "$out"
		trap - EXIT
		echo "build.sh: built $name in $((SECONDS - start))s" >&2
	fi
	printf '%s %s\n' "$name" "$out"
done
