#!/usr/bin/env bash
# Builds, exports and pushes kubetune's images without a Docker daemon (buildah and podman, Debian's packages).
#   hack/images.sh build [NAME...]     build (default: operator trainer server) from images/NAME/Dockerfile
#   hack/images.sh sizes [NAME...]     each image's reference and size
#   hack/images.sh archive [NAME...]   OCI archives: dist/images/NAME-TAG.oci.tar
#   hack/images.sh push REGISTRY [NAME...]   copy to REGISTRY/NAME:TAG (skopeo; registry credentials from
#                                      `skopeo login` or $REGISTRY_AUTH_FILE)
#   hack/images.sh refs [NAME...]      the references the build tags (the chart's defaults), nothing built
#   hack/images.sh env                 the variables that point podman at the images' storage (eval them)
# NAME is operator, trainer, server or server-cpu (the server's vLLM for CPU: images/server/Dockerfile's cpu
# target, tagged TAG-cpu). TAG is the version in pyproject.toml.
#
# The images' storage, the local base images and the build caches live in $KUBETUNE_CACHE/containers, outside
# the repository. A base image that the Dockerfile names and the storage lacks is made here from Debian's
# packages (mmdebstrap), since no container registry may be reachable: see docs/images.md.
set -euo pipefail
cd "$(dirname "$0")/.."

REGISTRY_DEFAULT=ghcr.io/kubetune
ALL=(operator trainer server)
export KUBETUNE_CACHE="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
store="$KUBETUNE_CACHE/containers"
version="$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"

ref() {  # NAME [REGISTRY] -> REGISTRY/REPOSITORY:TAG
  local registry="${2:-$REGISTRY_DEFAULT}"
  case "$1" in
    operator | trainer | server) echo "$registry/$1:$version" ;;
    server-cpu) echo "$registry/server:$version-cpu" ;;
    *) echo "unknown image '$1' (operator, trainer, server, server-cpu)" >&2; return 1 ;;
  esac
}

# The storage configuration podman, buildah and skopeo read (CONTAINERS_CONF, CONTAINERS_STORAGE_CONF). The
# runtime is runc with cgroupfs: crun refuses hosts whose cgroup v2 hierarchy holds controllers beside v1
# ("hybrid"), and machines without systemd have no systemd cgroup manager. The ulimits are the current hard
# limits: podman's defaults are higher and raising them needs CAP_SYS_RESOURCE, which containers (CI's
# included) may lack. Host networking: builds reach the package registries, runs reach the API server.
configure() {
  mkdir -p "$store/storage" "${KUBETUNE_BUILD_TMPDIR:-$store/tmp}"
  # The run-time state (locks, mounts) of one storage: two storages must never share it.
  local run nofile nproc
  run="/run/kubetune-containers/$(printf %s "$store" | sha256sum | cut -c1-12)"
  nofile="$(ulimit -Hn)"; nproc="$(ulimit -Hu)"
  [ "$nofile" = unlimited ] && nofile=1048576
  # podman lowers its own process limit to 32768 before it starts a container
  if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi
  cat >"$store/storage.conf" <<EOF
[storage]
driver = "${KUBETUNE_STORAGE_DRIVER:-overlay}"
graphroot = "$store/storage"
runroot = "$run/storage"
EOF
  cat >"$store/containers.conf" <<EOF
[containers]
netns = "host"
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$run/libpod"
EOF
  export CONTAINERS_CONF="$store/containers.conf" CONTAINERS_STORAGE_CONF="$store/storage.conf"
  # buildah keeps RUN --mount=type=cache folders under $TMPDIR; the uv cache is hack/setup.sh's, so the
  # trainer's and server's wheels are downloaded once for the virtual environment and the images together.
  # $TMPDIR also holds a layer while it is committed: KUBETUNE_BUILD_TMPDIR on a tmpfs saves that much disk.
  export TMPDIR="${KUBETUNE_BUILD_TMPDIR:-$store/tmp}"
  local caches="$TMPDIR/buildah-cache"
  [ "$(id -u)" = 0 ] || caches="$caches-$(id -u)"
  mkdir -p "$caches" "$KUBETUNE_CACHE/uv"
  [ -L "$caches/kubetune-uv" ] || { rm -rf "$caches/kubetune-uv"; ln -s "$KUBETUNE_CACHE/uv" "$caches/kubetune-uv"; }
}

install_tools() {
  local missing=()
  for tool in buildah podman skopeo mmdebstrap runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  [ "${#missing[@]}" -eq 0 ] && return
  echo "images: installing ${missing[*]} (apt-get)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# debian:VERSION-slim from the Debian mirror apt uses here: a minbase root file system without documentation
# (what the official slim images leave out), imported under the name the Dockerfile pulls. The build stops
# when the mirror serves another point release than the tag names, rather than tag one as the other.
make_debian_base() {
  local image="$1" tag version codename rootfs
  tag="${image##*:}"; version="${tag%-slim}"
  case "${version%%.*}" in 12) codename=bookworm ;; 13) codename=trixie ;;
    *) echo "images: no recipe for the base $image" >&2; return 1 ;; esac
  rootfs="$(mktemp -d -p /tmp)/rootfs.tar"
  echo "images: making $image from Debian $codename (mmdebstrap)" >&2
  local excludes=() path
  for path in doc man info locale lintian; do excludes+=(--dpkgopt="path-exclude=/usr/share/$path/*"); done
  # its chroot under $TMPDIR would be out of reach of apt's unprivileged download user
  TMPDIR=/tmp mmdebstrap --quiet --variant=minbase --mode=root --format=tar "${excludes[@]}" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --aptopt='Acquire::Languages "none"' \
    "$codename" "$rootfs" \
    "deb http://deb.debian.org/debian $codename main" \
    "deb http://deb.debian.org/debian $codename-updates main" \
    "deb http://deb.debian.org/debian-security $codename-security main"
  local served
  served="$(tar -xOf "$rootfs" ./etc/debian_version)"
  if [ "$served" != "$version" ]; then
    echo "images: the Debian mirror serves $served, the Dockerfile names $image: change its FROM" >&2
    return 1
  fi
  podman import --quiet --change 'CMD ["bash"]' "$rootfs" "docker.io/library/debian:$tag" >/dev/null
  rm -rf "$(dirname "$rootfs")"
}

ensure_bases() {  # the external bases of a Dockerfile
  local image
  for image in $(awk 'toupper($1) == "FROM" {print $2}' "$1"); do
    case "$image" in *:*) ;; *) continue ;; esac  # a stage of the same Dockerfile
    podman image exists "$image" && continue
    case "$image" in
      debian:*-slim | docker.io/library/debian:*-slim) make_debian_base "$image" ;;
      *) echo "images: $image is neither stored nor made here; pull it (podman pull) first" >&2; return 1 ;;
    esac
  done
}

# The CA bundle of this host, for the builds' downloads, where the host names one: a proxy that intercepts TLS
# signs with a CA that only the host trusts. It is mounted for the RUN steps, never copied into an image.
host_ca=()
host_bundle="${PIP_CERT:-${SSL_CERT_FILE:-}}"
if [ -n "$host_bundle" ]; then
  host_ca=(--volume "$host_bundle:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt
    --build-arg SSL_CERT_FILE=/run/host-ca.crt)
fi

build() {  # NAME; the builder's output goes to $KUBETUNE_CACHE/containers/logs/NAME.log
  local name="$1" dockerfile target=() start log
  dockerfile="images/${name%-cpu}/Dockerfile"
  [ "$name" = server-cpu ] && target=(--target cpu)
  ensure_bases "$dockerfile"
  log="$store/logs/$name.log"
  mkdir -p "$store/logs"
  start=$SECONDS
  if ! buildah build --layers --force-rm --pull=never --isolation chroot --network host "${target[@]}" "${host_ca[@]}" \
    -f "$dockerfile" -t "$(ref "$name")" . >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "images: building $(ref "$name") failed; the whole output is in $log" >&2
    return 1
  fi
  echo "images: built $(ref "$name") in $((SECONDS - start)) s" >&2
}

sizes() {
  local name
  for name in "$@"; do
    podman image inspect --format "{{.Size}}" "$(ref "$name")" |
      awk -v ref="$(ref "$name")" '{printf "%-45s %8.0f MB\n", ref, $1 / 1e6}'
  done
}

archive() {
  local name file
  mkdir -p dist/images
  for name in "$@"; do
    file="dist/images/$(ref "$name" | sed 's|.*/||; s|:|-|').oci.tar"
    rm -f "$file"
    skopeo copy --quiet "containers-storage:$(ref "$name")" "oci-archive:$file:$(ref "$name")"
    echo "$file $(du -m "$file" | cut -f1) MB"
  done
}

push() {
  local registry="$1" name
  shift
  for name in "$@"; do
    skopeo copy ${SKOPEO_FLAGS:-} "containers-storage:$(ref "$name")" "docker://$(ref "$name" "$registry")"
    echo "pushed $(ref "$name" "$registry")"
  done
}

command="${1:-build}"
[ $# -gt 0 ] && shift
case "$command" in
  push) [ $# -ge 1 ] || { echo "usage: hack/images.sh push REGISTRY [NAME...]" >&2; exit 2; }
    registry="$1"; shift ;;
esac
names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${ALL[@]}")
case "$command" in
  refs) for name in "${names[@]}"; do ref "$name"; done ;;
  env) configure; echo "export CONTAINERS_CONF=$CONTAINERS_CONF CONTAINERS_STORAGE_CONF=$CONTAINERS_STORAGE_CONF" ;;
  build) install_tools; configure
    for name in "${names[@]}"; do build "$name"; done
    sizes "${names[@]}" ;;
  sizes) configure; sizes "${names[@]}" ;;
  archive) install_tools; configure; archive "${names[@]}" ;;
  push) install_tools; configure; push "$registry" "${names[@]}" ;;
  *) echo "usage: hack/images.sh build|sizes|archive|push|refs|env [NAME...]" >&2; exit 2 ;;
esac
