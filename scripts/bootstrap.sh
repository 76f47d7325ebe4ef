# Sourced by scripts/serve and scripts/test: installs what the project needs, idempotently.
# Usage: source scripts/bootstrap.sh EXTRAS   (EXTRAS: worker,train | test; comma-separated extras)

ser_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ser_extras="${1:-worker}"

ser_log() { printf '[ser] %s\n' "$*" >&2; }

ser_system_packages() {
    # ffmpeg decodes M4A/AAC and WebM (and probes them at upload); flac encodes audio for Google's
    # speech API (SpeechRecognition bundles no encoder for ARM); espeak-ng and sox make test audio;
    # chromium runs the browser tests headless (with an emoji font for the emotion badges); nginx is
    # the production proxy, which tests/system/test_slow_clients.py runs in front of gunicorn.
    local wanted=(ffmpeg libsndfile1 flac)
    [ "$ser_extras" = test ] && wanted+=(espeak-ng sox chromium fonts-noto-color-emoji nginx)
    local missing=()
    for pkg in "${wanted[@]}"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        ser_log "installing system packages: ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        ser_log "please install: ${missing[*]} (M4A/WebM uploads fail without ffmpeg)"
    fi
}

ser_venv() {
    local venv="$ser_root/.venv"
    local stamp="$venv/.ser-installed-$ser_extras"
    local want
    # Both distributions: the server's, and the client's that its `ser submit|status|history` come from.
    want="$(cat "$ser_root/pyproject.toml" "$ser_root/client/pyproject.toml" | sha256sum | cut -c1-16)"
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
        ser_log "creating virtual environment in .venv"
        rm -rf "$venv"  # a half-made one (interrupted creation) is rebuilt, not reused
        python3 -m venv "$venv"
    fi
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        ser_log "installing the project with extras [$ser_extras] (first run takes a few minutes)"
        "$venv/bin/python" -m pip install -q --upgrade pip
        "$venv/bin/python" -m pip install -q -e "$ser_root/client"
        "$venv/bin/python" -m pip install -q -e "$ser_root[$ser_extras]"
        echo "$want" > "$stamp"
    fi
    export PATH="$venv/bin:$PATH"
}

ser_system_packages
ser_venv
