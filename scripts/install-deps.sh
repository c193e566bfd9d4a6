#!/usr/bin/env bash
# Installs what the tests and the demo need, from Debian's packages, only when missing.
# Safe to run again; needs root (or sudo) only when something must be installed.
set -euo pipefail

# tool -> Debian package
declare -A PACKAGE_OF=(
  [nbdcopy]=libnbd-bin
  [nbdinfo]=libnbd-bin
  [nbdfuse]=nbdfuse
  [fusermount3]=fuse3
  [nbdkit]=nbdkit
  [fio]=fio
  [qemu-img]=qemu-utils
  [losetup]=util-linux
  [mkfs.ext4]=e2fsprogs
  [python3]=python3
  [nft]=nftables
  [mkfs.xfs]=xfsprogs
  [mkfs.btrfs]=btrfs-progs
  [docker]=docker.io
  [dockerd]=docker.io
  [busybox]=busybox-static
  [sfdisk]=fdisk
  [blkid]=util-linux
  [wipefs]=util-linux
  [mkswap]=util-linux
  [unshare]=util-linux
  [addpart]=util-linux
  [delpart]=util-linux
)

missing=()
for tool in "${!PACKAGE_OF[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${PACKAGE_OF[$tool]}")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "installing: ${packages[*]}" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
for tool in "${!PACKAGE_OF[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool still missing after installing ${PACKAGE_OF[$tool]}" >&2; exit 1; }
done
