#!/usr/bin/env bash
# Drives the playground (GET /) in headless Chromium through the DevTools
# protocol (scripts/playground_check.mjs, plain Node): loads the page with a
# prompt, lets it stream a generation (text and a picture), checks that the
# text arrived coloured by adapter and that a finished picture is shown, and
# saves screenshots of the generation (and of a picture still forming, when
# one is caught) and of the compare view.
#
#   scripts/playground_check.sh                   # starts `molora serve` on models/demo
#   MODEL=path/to/model scripts/playground_check.sh
#   URL=http://127.0.0.1:8080 scripts/playground_check.sh   # an already running server
#
# Output: $OUT (default target/playground): dom.json, playground.png,
# playground_forming.png (when caught), compare.png, chromium.log.
# Needs Debian's chromium and nodejs (installed with apt-get when missing).
set -euo pipefail

OUT=${OUT:-target/playground}
MODEL=${MODEL:-models/demo}
PORT=${PORT:-18089}
URL=${URL:-}
PROMPT=${PROMPT:-draw a red circle}
mkdir -p "$OUT"

if ! command -v chromium >/dev/null 2>&1; then
    echo "installing chromium" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

SERVER_PID=""
CHROME_PID=""
cleanup() {
    for pid in $CHROME_PID $SERVER_PID; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
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
# Room for one whole picture and some text after it.
TPI=$(curl -sf "$URL/v1/models" | python3 -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["info"]["vocab"]["tokens_per_image"])')
MAX_TOKENS=$((TPI + 2 + 24))
QUERY="image_start=1&max_tokens=$MAX_TOKENS&seed=3&prompt=$(urlencode "$PROMPT")"
PAGE="$URL/?auto=generate&$QUERY"
COMPARE="$URL/?auto=compare&$QUERY"

if ! command -v node >/dev/null 2>&1; then
    echo "installing nodejs" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs >/dev/null
fi
# Node < 22 has WebSocket behind a flag.
NODE_FLAGS=""
node -e 'if (typeof WebSocket === "undefined") process.exit(1)' 2>/dev/null || NODE_FLAGS="--experimental-websocket"

chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
    --disable-component-update --disable-sync --no-first-run --disable-dev-shm-usage \
    --user-data-dir="$PROFILE" --remote-debugging-port=0 about:blank >"$OUT/chromium.log" 2>&1 &
CHROME_PID=$!
for _ in $(seq 1 100); do
    [ -s "$PROFILE/DevToolsActivePort" ] && break
    sleep 0.1
done
DEVTOOLS_PORT=$(head -n1 "$PROFILE/DevToolsActivePort")
status=0
node $NODE_FLAGS "$(dirname "$0")/playground_check.mjs" "$DEVTOOLS_PORT" "$PAGE" "$COMPARE" "$OUT" || status=$?
kill "$CHROME_PID" 2>/dev/null || true
wait "$CHROME_PID" 2>/dev/null || true
exit $status
