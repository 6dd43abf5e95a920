# shellcheck shell=bash
# Shared by scripts/rabbitmq4 and scripts/cluster: run extra RabbitMQ nodes
# next to the system one, each with its own name, ports, data and log dirs,
# never touching the node on 5672. Two flavours:
#   4    RabbitMQ 4.0.5 from a cached Debian trixie root (debootstrap), run
#        with chroot as the root's rabbitmq user;
#   3.10 this machine's own binaries, run as root with a private HOME (so a
#        private Erlang cookie: these nodes can never join the system node).
# Debian's /usr/sbin/rabbitmq* wrappers `su` to the rabbitmq user and drop
# the environment, so the scripts under /usr/lib/rabbitmq/bin are called
# directly with every setting in the environment.

LLMQ_CACHE=${LLMQ_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llmq}
TRIXIE_ROOT=${LLMQ_RABBITMQ4_ROOT:-$LLMQ_CACHE/trixie-rabbitmq}
# Inside the trixie root, where the nodes keep their state.
NODES_IN_ROOT=/var/lib/llmq-nodes

die() { echo "llmq: $*" >&2; exit 1; }
say() { echo "llmq: $*" >&2; }

need_root() {
  [ "$(id -u)" = 0 ] || die "$1 needs root (debootstrap, chroot, mount)"
}

# The Debian mirror apt already uses (deb822 or one-line sources).
debian_mirror() {
  local uri
  uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | awk '{print $2}' | grep -v -- '-security' | grep -i debian | head -n1 || true)
  if [ -z "$uri" ]; then
    uri=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
      | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' \
      | grep -v -- '-security' | grep -i debian | head -n1 || true)
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

# Build the trixie root once; a half-built root is never reused because the
# build goes to a temp dir that is renamed only on success.
build_root() {
  [ -x "$TRIXIE_ROOT/usr/lib/rabbitmq/bin/rabbitmq-server" ] && return 0
  need_root "building the RabbitMQ 4 root"
  if ! command -v debootstrap >/dev/null 2>&1; then
    say "installing debootstrap..."
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  fi
  local mirror tmp
  mirror=$(debian_mirror)
  mkdir -p "$(dirname "$TRIXIE_ROOT")"
  tmp=$(mktemp -d "$TRIXIE_ROOT.build.XXXXXX")
  chmod 755 "$tmp" # mktemp's 0700 would lock the root's own users out of /
  say "building a Debian trixie root with rabbitmq-server in $TRIXIE_ROOT (from $mirror; once, about 2 minutes)..."
  if ! debootstrap --variant=minbase --include=rabbitmq-server trixie "$tmp" "$mirror" \
    >"$tmp.log" 2>&1; then
    tail -n 20 "$tmp.log" >&2
    umount_proc "$tmp"
    rm -rf --one-file-system "$tmp"
    die "debootstrap failed (log: $tmp.log)"
  fi
  # Name lookups of @localhost must not depend on the root's defaults.
  printf '127.0.0.1 localhost\n::1 localhost ip6-localhost\n' >"$tmp/etc/hosts"
  # The Debian package enables and starts nothing in a chroot; keep its
  # system-wide files out of our nodes' way all the same.
  mkdir -p "$tmp$NODES_IN_ROOT"
  chroot "$tmp" apt-get clean >/dev/null 2>&1 || true
  mv "$tmp" "$TRIXIE_ROOT"
  mv "$tmp.log" "$TRIXIE_ROOT.build.log"
  say "built $TRIXIE_ROOT ($(du -sh --one-file-system "$TRIXIE_ROOT" | cut -f1))"
}

mount_proc() {
  local root=$1
  mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
}

umount_proc() {
  local root=$1
  if mountpoint -q "$root/proc" 2>/dev/null; then umount "$root/proc" || umount -l "$root/proc"; fi
}

raise_nofile() {
  ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
}

# --- one node ---------------------------------------------------------------
# A node is described by: FLAVOUR (4 | 3.10), NAME (e.g. rabbit4@localhost),
# PORT (AMQP), DIST (Erlang distribution port), BASE (its state dir as the
# node sees it) and HOSTBASE (the same dir as seen from the host).

node_setup() { # flavour name port dist
  FLAVOUR=$1 NAME=$2 PORT=$3 DIST=$4
  local short=${NAME%@*}
  case $FLAVOUR in
    4)
      BASE=$NODES_IN_ROOT/$short
      HOSTBASE=$TRIXIE_ROOT$BASE
      ;;
    3.10)
      BASE=$LLMQ_CACHE/rabbitmq-3.10-nodes/$short
      HOSTBASE=$BASE
      ;;
    *) die "unknown RabbitMQ flavour $FLAVOUR (4 or 3.10)" ;;
  esac
}

# The environment every rabbitmq script of this node runs with.
node_env() {
  local home
  case $FLAVOUR in
    4) home=/var/lib/rabbitmq ;;     # the root's own cookie, shared by its nodes
    3.10) home=$(dirname "$BASE")/home ;; # a private cookie, never the system node's
  esac
  echo "HOME=$home"
  echo "PATH=/usr/lib/rabbitmq/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  echo "LANG=C.UTF-8"
  echo "RABBITMQ_NODENAME=$NAME"
  echo "RABBITMQ_NODE_PORT=$PORT"
  echo "RABBITMQ_DIST_PORT=$DIST"
  echo "RABBITMQ_CONFIG_FILE=$BASE/rabbitmq.conf"
  echo "RABBITMQ_ADVANCED_CONFIG_FILE=$BASE/advanced.config"
  echo "RABBITMQ_CONF_ENV_FILE=$BASE/rabbitmq-env.conf"
  echo "RABBITMQ_ENABLED_PLUGINS_FILE=$BASE/enabled_plugins"
  echo "RABBITMQ_MNESIA_BASE=$BASE/mnesia"
  echo "RABBITMQ_LOG_BASE=$BASE/log"
  echo "RABBITMQ_PID_FILE=$BASE/beam.pid"
}

# The command line of one of /usr/lib/rabbitmq/bin/* for this node, in CMD.
node_cmd() { # program args...
  local prog=$1
  shift
  local -a env
  mapfile -t env < <(node_env)
  case $FLAVOUR in
    4)
      mount_proc "$TRIXIE_ROOT"
      local ids
      ids=$(awk -F: '$1 == "rabbitmq" {print $3 ":" $4}' "$TRIXIE_ROOT/etc/passwd")
      CMD=(chroot --userspec="$ids" "$TRIXIE_ROOT" /usr/bin/env -i "${env[@]}"
        "/usr/lib/rabbitmq/bin/$prog" "$@")
      ;;
    3.10)
      CMD=(/usr/bin/env -i "${env[@]}" "/usr/lib/rabbitmq/bin/$prog" "$@")
      ;;
  esac
}

node_run() { # program args...
  node_cmd "$@"
  "${CMD[@]}"
}

node_ctl() { node_run rabbitmqctl -q -n "$NAME" "$@"; }

node_pid() {
  local pid
  pid=$(cat "$HOSTBASE/beam.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
}

node_running() { [ -n "$(node_pid)" ]; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Extra rabbitmq.conf lines for the next node_start (the cluster sets some).
NODE_CONF=()

# Write the node's config: like a RabbitMQ 4.3 default where 4.0 is lenient.
node_configure() {
  mkdir -p "$HOSTBASE/mnesia" "$HOSTBASE/log" "$(dirname "$HOSTBASE")/home"
  {
    echo "listeners.tcp.default = 127.0.0.1:$PORT"
    echo "loopback_users.guest = true"
    echo "log.console = false"
    echo "log.file.level = info"
    if [ "$FLAVOUR" = 4 ]; then
      echo "deprecated_features.permit.transient_nonexcl_queues = false"
      echo "deprecated_features.permit.global_qos = false"
    fi
    for line in "${NODE_CONF[@]}"; do echo "$line"; done
  } >"$HOSTBASE/rabbitmq.conf"
  echo "[]." >"$HOSTBASE/advanced.config"
  : >"$HOSTBASE/rabbitmq-env.conf"
  [ -f "$HOSTBASE/enabled_plugins" ] || echo "[]." >"$HOSTBASE/enabled_plugins"
  if [ "$FLAVOUR" = 4 ]; then
    chown -R "$(awk -F: '$1 == "rabbitmq" {print $3 ":" $4}' "$TRIXIE_ROOT/etc/passwd")" \
      "$HOSTBASE"
  fi
}

# Start the node in the background; node_await waits for it. Split so that a
# cluster's nodes start together: a restarted Mnesia node waits for the peer
# that stopped last, so starting them one at a time can wait for minutes.
node_launch() {
  LAUNCHED=
  if node_running; then return 0; fi
  if port_open "$PORT"; then die "port $PORT is taken by something else than $NAME"; fi
  node_configure
  raise_nofile
  # A foreground node in its own session (Ctrl-C on a test run does not
  # reach it); its pid file says which beam it is.
  rm -f "$HOSTBASE/beam.pid"
  node_cmd rabbitmq-server
  setsid "${CMD[@]}" >>"$HOSTBASE/log/stdout.log" 2>&1 </dev/null &
  LAUNCHED=$!
}

# Wait until the node has booted; fails (1) when it stopped trying.
node_await() { # [launched pid]
  local launched=${1:-}
  for _ in $(seq 1 300); do
    if node_running && node_ctl await_startup --timeout 5 >/dev/null 2>&1; then return 0; fi
    if [ -n "$launched" ]; then kill -0 "$launched" 2>/dev/null || return 1; fi
    sleep 1
  done
  return 1
}

node_failed() {
  tail -n 30 "$HOSTBASE/log/stdout.log" >&2 || true
  die "$NAME did not start (logs: $HOSTBASE/log)"
}

node_start() {
  node_launch
  node_await "$LAUNCHED" || node_failed
}

node_stop() {
  local pid
  pid=$(node_pid)
  [ -n "$pid" ] || return 0
  node_ctl stop >/dev/null 2>&1 || true

  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 1
  done
  say "$NAME did not stop within 60 s: killing beam $pid"
  kill -9 "$pid" 2>/dev/null || true
}

node_kill() {
  local pid
  pid=$(node_pid)
  [ -n "$pid" ] || die "$NAME is not running"
  kill -9 "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
}
