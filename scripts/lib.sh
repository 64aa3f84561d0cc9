# Shared by scripts/test and scripts/up: make sure Postgres and NATS JetStream are reachable,
# reusing DATABASE_URL / NATS_URL (or the default local servers) when they answer, and
# otherwise starting throwaway local instances (installing them with apt-get if missing).
# Sourced, not run. Exports DATABASE_URL and NATS_URL.

RUN_DIR=${RUN_DIR:-"$(pwd)/.run"}
mkdir -p "$RUN_DIR"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "need $* but not root: install it (apt-get install $*) and try again" >&2
    exit 1
  fi
  log "installing $* with apt-get"
  if [ -z "${SWITCHBOARD_APT_UPDATED:-}" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    export SWITCHBOARD_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

tcp_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# Host and port of a URL like scheme://user@host:port/db
url_host() { local u=${1#*://}; u=${u#*@}; u=${u%%/*}; u=${u%%\?*}; echo "${u%%:*}"; }
url_port() { local u=${1#*://}; u=${u#*@}; u=${u%%/*}; u=${u%%\?*}; [[ $u == *:* ]] && echo "${u##*:}" || echo "$2"; }

pg_bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

# ensure_postgres [DBNAME]: DBNAME (default `postgres`) names the database in the URL
# exported when DATABASE_URL is not set or a throwaway server is started.
ensure_postgres() {
  local db=${1:-postgres}
  local url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/$db}
  if tcp_open "$(url_host "$url")" "$(url_port "$url" 5432)"; then
    export DATABASE_URL=$url
    return
  fi
  if [ -n "${DATABASE_URL:-}" ]; then
    log "DATABASE_URL ($DATABASE_URL) does not answer; starting a throwaway Postgres instead"
  fi
  [ -n "$(pg_bindir)" ] || apt_install postgresql
  local bin dir port
  bin=$(pg_bindir)
  dir="$RUN_DIR/postgres"
  if [ -f "$dir/port" ] && tcp_open 127.0.0.1 "$(cat "$dir/port")"; then
    port=$(cat "$dir/port")
  else
    port=$(free_port)
    rm -rf "$dir" && mkdir -p "$dir"
    local as=()
    if [ "$(id -u)" -eq 0 ]; then chown postgres "$dir"; as=(runuser -u postgres --); fi
    log "starting a throwaway Postgres on 127.0.0.1:$port (data in $dir)"
    "${as[@]}" "$bin/initdb" -D "$dir/data" -U postgres --auth=trust >/dev/null
    "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
    echo "$port" >"$dir/port"
  fi
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/$db"
}

ensure_nats_binary() {
  command -v nats-server >/dev/null || apt_install nats-server
}

ensure_nats() {
  ensure_nats_binary
  local url=${NATS_URL:-nats://127.0.0.1:4222}
  if tcp_open "$(url_host "$url")" "$(url_port "$url" 4222)"; then
    export NATS_URL=$url
    return
  fi
  if [ -n "${NATS_URL:-}" ]; then
    log "NATS_URL ($NATS_URL) does not answer; starting a throwaway nats-server instead"
  fi
  local dir="$RUN_DIR/nats" port
  if [ -f "$dir/port" ] && tcp_open 127.0.0.1 "$(cat "$dir/port")"; then
    port=$(cat "$dir/port")
  else
    port=$(free_port)
    rm -rf "$dir" && mkdir -p "$dir"
    log "starting a throwaway nats-server (JetStream) on 127.0.0.1:$port (store in $dir)"
    nohup nats-server -js -a 127.0.0.1 -p "$port" -sd "$dir/store" >"$dir/nats.log" 2>&1 &
    echo $! >"$dir/pid"
    echo "$port" >"$dir/port"
    for _ in $(seq 100); do tcp_open 127.0.0.1 "$port" && break; sleep 0.1; done
  fi
  export NATS_URL="nats://127.0.0.1:$port"
}

# Stops the throwaway instances started above, if any.
stop_throwaways() {
  if [ -f "$RUN_DIR/nats/pid" ]; then
    kill "$(cat "$RUN_DIR/nats/pid")" 2>/dev/null || true
    rm -f "$RUN_DIR/nats/pid" "$RUN_DIR/nats/port"
  fi
  if [ -f "$RUN_DIR/postgres/port" ]; then
    local as=()
    [ "$(id -u)" -eq 0 ] && as=(runuser -u postgres --)
    "${as[@]}" "$(pg_bindir)/pg_ctl" -D "$RUN_DIR/postgres/data" -m fast stop >/dev/null 2>&1 || true
    rm -f "$RUN_DIR/postgres/port"
  fi
}

# The dashboard test drives Debian's headless Chromium.
ensure_chromium() {
  command -v chromium >/dev/null || command -v chromium-browser >/dev/null || apt_install chromium
}

# The API fuzzing test (services/ingest/tests/api/schemathesis.rs) runs schemathesis from PyPI,
# pinned, in a virtualenv under the run directory. Exports SCHEMATHESIS.
SCHEMATHESIS_VERSION=4.32.5
ensure_schemathesis() {
  local venv="$RUN_DIR/venv"
  if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
    command -v python3 >/dev/null || apt_install python3
    python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$venv"; }
    log "installing schemathesis $SCHEMATHESIS_VERSION (PyPI) into $venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
  fi
  export SCHEMATHESIS="$venv/bin/schemathesis"
}
