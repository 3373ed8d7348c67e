#!/usr/bin/env bash
# Installs Mesa's software Vulkan driver (lavapipe, the "llvmpipe" adapter)
# so that the wgpu backend's tests run on machines without a GPU. Idempotent:
# does nothing when the lavapipe ICD is already installed.
set -euo pipefail

icd=/usr/share/vulkan/icd.d/lvp_icd.x86_64.json
if [ -f "$icd" ] || ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1; then
    echo "lavapipe already installed"
    exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then sudo=sudo; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq mesa-vulkan-drivers >/dev/null
ls /usr/share/vulkan/icd.d/lvp_icd.*.json
echo "lavapipe installed"
