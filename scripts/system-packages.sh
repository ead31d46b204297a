#!/usr/bin/env bash
# The Debian/Ubuntu packages that the tests need, installed when missing (scripts/test.sh runs this):
#   libportaudio2                                  PortAudio: microphone capture (sounddevice)
#   pulseaudio pulseaudio-utils libasound2-plugins the virtual microphone of the end-to-end mic test
#   libespeak-ng1                                  the system libespeak-ng: cpc-synth's fallback where the
#                                                  espeakng-loader wheel is not installed, and the reference
#                                                  the bundled library is compared with
# As root with apt-get, otherwise through sudo (non-interactive, or asking for the password on a terminal);
# with neither, or with CPC_NO_APT=1, it installs nothing and says in one line what is missing: the tests
# that need it then skip, naming the package. Checks with dpkg-query first: quiet, and no apt-get update,
# when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=(libportaudio2 pulseaudio pulseaudio-utils libasound2-plugins libespeak-ng1)

if ! command -v dpkg-query >/dev/null || ! command -v apt-get >/dev/null; then
  echo "test.sh: no apt-get here: install PortAudio, PulseAudio (with its ALSA plugin) and libespeak-ng with" \
    "your package manager, or the tests that need them skip" >&2
  exit 0
fi
missing=()
for p in "${pkgs[@]}"; do
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

as_root=()
if [ "${CPC_NO_APT:-0}" = 1 ]; then
  how="CPC_NO_APT=1"
elif [ "$(id -u)" = 0 ]; then
  how=root
elif command -v sudo >/dev/null; then
  if sudo -n true 2>/dev/null || [ -t 0 ]; then
    how=sudo as_root=(sudo)
  else
    how="not root, sudo needs a password and there is no terminal"
  fi
else
  how="not root, no sudo"
fi
if [ "$how" != root ] && [ "$how" != sudo ]; then
  echo "test.sh: missing ${missing[*]} ($how): the tests that need them skip;" \
    "to run them: sudo apt-get install --no-install-recommends ${missing[*]}" >&2
  exit 0
fi

echo "test.sh: installing ${missing[*]} (apt-get${as_root[*]:+ through sudo})"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { ${as_root[@]+"${as_root[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
  ${as_root[@]+"${as_root[@]}"} env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "test.sh: apt-get could not install ${missing[*]} (above); CPC_NO_APT=1 bash scripts/test.sh runs" \
    "without them, the tests that need them skipped" >&2
  exit 1
fi
