#!/bin/sh
# Install Debian's Chromium for the browser demo test (tests/e2e/test_browser.py), where
# that is possible: as root, with apt-get. Browsers are never downloaded from anywhere
# else. This script never fails the build: without Chromium the browser test skips and
# says why.
set -u

if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium: no apt-get here; the browser test will be skipped" >&2
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_chromium: not root; run 'sudo apt-get install chromium chromium-driver' to enable the browser test" >&2
    exit 0
fi
echo "install_chromium: apt-get install chromium chromium-driver" >&2
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; then
    # The package lists may be missing or stale (fresh containers): refresh once and retry.
    apt-get update -q >/dev/null 2>&1 || true
    apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
        || echo "install_chromium: apt-get failed; the browser test will be skipped" >&2
fi
exit 0
