#!/usr/bin/env bash
# Drives the playground (GET /) in headless Chromium: loads the page with a
# prompt, lets it stream a generation (text and a picture), checks that text
# spans and a finished image are in the DOM, and saves screenshots of the
# generation and of the compare view.
#
#   scripts/playground_check.sh                   # starts `molora serve` on models/demo
#   MODEL=path/to/model scripts/playground_check.sh
#   URL=http://127.0.0.1:8080 scripts/playground_check.sh   # an already running server
#
# Output: $OUT (default target/playground): dom.html, playground.png, compare.png.
# Needs Debian's chromium (installed with apt-get when missing).
set -euo pipefail

OUT=${OUT:-target/playground}
MODEL=${MODEL:-models/demo}
PORT=${PORT:-18089}
URL=${URL:-}
PROMPT=${PROMPT:-draw a red circle}
BUDGET_MS=${BUDGET_MS:-20000}
mkdir -p "$OUT"

if ! command -v chromium >/dev/null 2>&1; then
    echo "installing chromium" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    rm -rf "$PROFILE"
}
PROFILE=$(mktemp -d)
trap cleanup EXIT

if [ -z "$URL" ]; then
    cargo build --release --quiet
    URL="http://127.0.0.1:$PORT"
    target/release/molora serve --model "$MODEL" --bind "127.0.0.1:$PORT" --data-dir "$OUT/data" \
        >"$OUT/server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 300); do
        curl -sf "$URL/health" >/dev/null 2>&1 && break
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$OUT/server.log" >&2; exit 1; }
        sleep 0.2
    done
fi
curl -sf "$URL/health" >/dev/null || { echo "no server at $URL" >&2; exit 1; }

urlencode() { python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$1"; }
PAGE="$URL/?auto=generate&image_start=1&max_tokens=48&seed=3&prompt=$(urlencode "$PROMPT")"
COMPARE="$URL/?auto=compare&image_start=1&max_tokens=48&seed=3&prompt=$(urlencode "$PROMPT")"

chrome() {
    chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
        --disable-component-update --disable-sync --no-first-run --disable-dev-shm-usage \
        --user-data-dir="$PROFILE" --virtual-time-budget="$BUDGET_MS" --window-size=1280,1100 "$@" 2>/dev/null
}

chrome --dump-dom "$PAGE" >"$OUT/dom.html"
chrome --screenshot="$OUT/playground.png" "$PAGE" >/dev/null
chrome --screenshot="$OUT/compare.png" "$COMPARE" >/dev/null

fail=0
check() {
    if grep -q "$2" "$OUT/dom.html"; then echo "ok: $1"; else echo "FAILED: $1" >&2; fail=1; fi
}
check "the generation finished" 'id="output"[^>]*data-done="1"'
check "text streamed in, coloured by adapter" '<span class="tok"'
check "a finished picture is shown" '<img[^>]*class="final"[^>]*src="data:image/png;base64,'
check "the stats line was written" 'passes [0-9]'
for f in playground.png compare.png; do
    [ -s "$OUT/$f" ] && echo "ok: screenshot $OUT/$f" || { echo "FAILED: no $OUT/$f" >&2; fail=1; }
done
exit $fail
