#!/usr/bin/env bash
# Installs the system packages proofmesh needs to build: cmake and a C/C++ toolchain for
# llama.cpp, clang + libclang for llama-cpp-2's bindgen; iproute2 and iptables for the network
# tests. Does nothing when they are present.
set -euo pipefail

if ! command -v cargo >/dev/null 2>&1; then
  echo "proofmesh needs a Rust toolchain (1.88 or newer): install it from https://rustup.rs and rerun." >&2
  exit 1
fi

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v clang >/dev/null 2>&1 || missing+=(clang)
command -v c++ >/dev/null 2>&1 || missing+=(g++)
if ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 && ! ldconfig -p 2>/dev/null | grep -q libclang; then
  missing+=(libclang-dev)
fi
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v curl >/dev/null 2>&1 || missing+=(curl)
# The official OpenAI Node client test.
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
# The mDNS and topology tests build hosts from network namespaces; the NAT routers masquerade.
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "installing system packages: ${missing[*]}" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "please install as root: apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq "${missing[@]}" >/dev/null
