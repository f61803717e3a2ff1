#!/usr/bin/env bash
# Make sure the Chromium that tests/test_studio_browser.py drives is installed (Debian's package: Playwright
# downloads no browser). Used by `make test`; a no-op when /usr/bin/chromium (or $ETHER_STUDIO_CHROMIUM) exists.
set -euo pipefail
chromium="${ETHER_STUDIO_CHROMIUM:-/usr/bin/chromium}"
[ -x "$chromium" ] && exit 0
[ "${ETHER_STUDIO_SKIP_BROWSER:-}" = "1" ] && exit 0
echo "Chromium is missing ($chromium): installing Debian's chromium package for the studio's browser test" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi
fi
if command -v apt-get >/dev/null 2>&1 && \
   $sudo apt-get update -qq && \
   $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; then
  exit 0
fi
cat >&2 <<MSG
error: could not install Chromium, which the studio's browser test needs.
  - on Debian/Ubuntu: sudo apt-get install chromium   (then run make test again)
  - elsewhere: install Chromium and set ETHER_STUDIO_CHROMIUM=/path/to/chromium
  - or skip only the browser test, deliberately: ETHER_STUDIO_SKIP_BROWSER=1 make test
MSG
exit 1
