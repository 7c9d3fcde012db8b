#!/usr/bin/env bash
# shellcheck disable=SC2015 # `a && b || die`: die when either fails, as meant
# Real servers for fwagent's integration tests, all on 127.0.0.1.
#
#   scripts/test-servers.sh start    install what is missing, (re)start all, write the env file
#   scripts/test-servers.sh stop     stop everything this script started (and a mosquitto that
#                                    a test restarted from FWAGENT_TEST_MOSQUITTO_CMD)
#   scripts/test-servers.sh status   print the env file and which servers are alive
#   scripts/test-servers.sh logs     print the last lines of each server's log
#   scripts/test-servers.sh clean    stop, then remove the run directory
#
# Everything lives under one run directory (default target/test-servers, override with
# FWAGENT_TEST_SERVERS_DIR); nothing is written into the source tree. `start` writes
# $RUN/env with `export FWAGENT_TEST_...=...` lines; source it before `cargo test`.
#
# Servers:
#   nginx       docroot $RUN/nginx/root; /slow/ (1 MB/s), /slow256k/, /slow2m/, /slow4m/,
#               /slow8m/, /rate/<N[k|m]>/ (any rate, bytes per second), /auth/ (Basic
#               fwuser:fwpass), /norange/ (Range ignored), /status/NNN, /redirect/X -> /X; JSON
#               access log with $status $bytes_sent $request_uri $http_range; a TLS listener
#               with a certificate from a throwaway CA ($RUN/tls/ca.pem).
#   pyftpdlib   user ftpuser/ftppass, root $RUN/ftp/root (writable), passive ports in a block.
#   vsftpd      anonymous only, root $RUN/vsftpd/root, passive ports in a block.
#   mosquitto   anonymous, persistence in $RUN/mosquitto, plus a TLS listener (same CA).
#
# Ports: one random-start scan of 20000-32000 (below Linux's ephemeral range, so outgoing
# connections never take them), each port verified free by binding it; passive FTP ranges are
# blocks of 32 consecutive free ports from the same scan.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN="${FWAGENT_TEST_SERVERS_DIR:-$ROOT/target/test-servers}"
ENV_FILE="$RUN/env"
PIDS="$RUN/pids"
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
PYTHON="${PYTHON:-python3}"

HTTP_USER=fwuser
HTTP_PASS=fwpass
FTP_USER=ftpuser
FTP_PASS=ftppass

log() { printf '[test-servers] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
    IS_ROOT=1
else
    IS_ROOT=0
    if command -v sudo >/dev/null 2>&1; then SUDO=(sudo -n); else SUDO=(); fi
fi
as_root() {
    if [ "$IS_ROOT" -eq 1 ]; then "$@"; elif [ "${#SUDO[@]}" -gt 0 ]; then "${SUDO[@]}" "$@"; else
        die "need root (or passwordless sudo) to run: $*"
    fi
}

# ---------------------------------------------------------------- install

have() { command -v "$1" >/dev/null 2>&1; }
have_pyftpdlib() { "$PYTHON" -c 'import pyftpdlib' >/dev/null 2>&1; }
have_fusepy() { /usr/bin/python3 -c 'import fusepy' >/dev/null 2>&1; }

install_missing() {
    local pkgs=() nginx_pkg=""
    have nginx || nginx_pkg=1
    have vsftpd || pkgs+=(vsftpd)
    have mosquitto || pkgs+=(mosquitto)
    { have mosquitto_pub && have mosquitto_sub; } || pkgs+=(mosquitto-clients)
    have curl || pkgs+=(curl)
    have openssl || pkgs+=(openssl)
    have setsid || pkgs+=(util-linux)
    have "$PYTHON" || pkgs+=(python3)
    # tests/lying_disk.rs mounts scripts/lyingfs.py (FUSE) with Debian's python3 and its fusepy.
    have_fusepy || pkgs+=(python3-fusepy)
    if [ -n "$nginx_pkg" ] || [ "${#pkgs[@]}" -gt 0 ]; then
        have apt-get || die "missing servers and no apt-get: install nginx vsftpd mosquitto mosquitto-clients by hand"
        export DEBIAN_FRONTEND=noninteractive
        log "apt-get update"
        as_root apt-get update -q >"$RUN/apt.log" 2>&1 || { cat "$RUN/apt.log" >&2; die "apt-get update failed"; }
        if [ -n "$nginx_pkg" ]; then
            # On bookworm nginx-light is only a transitional package for nginx (+ echo module).
            if apt-cache show nginx-light >/dev/null 2>&1; then pkgs+=(nginx-light); else pkgs+=(nginx); fi
        fi
        # Keep the packages' postinst from starting system-wide daemons on ports 80/21/1883.
        local policy=/usr/sbin/policy-rc.d made_policy=0
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
            as_root chmod 755 "$policy"
            made_policy=1
        fi
        log "apt-get install ${pkgs[*]}"
        local rc=0
        as_root apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"$RUN/apt.log" 2>&1 || rc=$?
        if [ "$rc" -ne 0 ] && [[ " ${pkgs[*]} " == *" nginx-light "* ]]; then
            log "nginx-light failed to install; trying nginx"
            pkgs=("${pkgs[@]/nginx-light/nginx}")
            rc=0
            as_root apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"$RUN/apt.log" 2>&1 || rc=$?
        fi
        [ "$made_policy" -eq 1 ] && as_root rm -f "$policy"
        if [ "$rc" -ne 0 ]; then tail -n 40 "$RUN/apt.log" >&2; die "apt-get install failed"; fi
    fi
    if ! have_pyftpdlib; then
        log "pip install pyftpdlib"
        local pipq=(-m pip install --quiet --disable-pip-version-check pyftpdlib)
        if ! "$PYTHON" "${pipq[@]}" >"$RUN/pip.log" 2>&1 &&
            ! "$PYTHON" "${pipq[@]}" --break-system-packages >>"$RUN/pip.log" 2>&1; then
            # No pip for this python: Debian's package, for Debian's python.
            as_root apt-get install -y -q python3-pyftpdlib >>"$RUN/pip.log" 2>&1 ||
                { cat "$RUN/pip.log" >&2; die "could not install pyftpdlib"; }
            have_pyftpdlib || PYTHON=/usr/bin/python3
        fi
        have_pyftpdlib || die "pyftpdlib installed but '$PYTHON -c import pyftpdlib' fails"
    fi
    for b in nginx vsftpd mosquitto mosquitto_pub mosquitto_sub curl openssl setsid; do
        have "$b" || die "$b still missing after install"
    done
    have_fusepy || die "python3-fusepy still missing after install (/usr/bin/python3 -c 'import fusepy' fails)"
}

# ---------------------------------------------------------------- ports

# Prints: nginx nginx_tls ftp vsftpd mqtt mqtts ftp_pasv_min vsftpd_pasv_min
pick_ports() {
    "$PYTHON" - <<'EOF'
import random, socket
LO, HI, SINGLES, BLOCKS, BLOCK = 20000, 32000, 6, 2, 32
def free(p):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", p))
        return True
    except OSError:
        return False
    finally:
        s.close()
p = random.randrange(LO, HI - 1000)
singles, blocks = [], []
while len(singles) < SINGLES or len(blocks) < BLOCKS:
    if p + BLOCK >= HI:
        p = LO
    if len(singles) < SINGLES:
        if free(p):
            singles.append(p)
        p += 1
        continue
    if all(free(q) for q in range(p, p + BLOCK)):
        blocks.append(p)
        p += BLOCK
    else:
        p += 1
print(*singles, *blocks)
EOF
}

# group_alive PGID: some member of the process group is running (zombies don't count: here
# the init process reaps orphans only every second or two).
group_alive() {
    ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'
}
# pid_alive PID: running and not a zombie
pid_alive() {
    local st
    st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ "$st" != Z* ]]
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_port NAME PORT LOGFILE: until PORT accepts, the server's process group alive.
wait_port() {
    local name=$1 port=$2 logf=$3 pgid i
    pgid=$(cat "$PIDS/$name")
    for ((i = 0; i < 300; i++)); do
        port_open "$port" && return 0
        if ! group_alive "$pgid"; then
            log "$name exited before listening on $port; its log:"
            tail -n 30 "$logf" >&2 || true
            return 1
        fi
        sleep 0.1
    done
    log "$name did not listen on $port within 30 s; its log:"
    tail -n 30 "$logf" >&2 || true
    return 1
}

# spawn NAME LOGFILE CMD...: CMD in its own session (so stop can kill its whole process
# group, e.g. vsftpd's per-connection children), stdio away from the caller's pipes.
spawn() {
    local name=$1 logf=$2 pid pgid
    shift 2
    setsid "$@" </dev/null >>"$logf" 2>&1 8>&- 9>&- &
    pid=$!
    # setsid execs in place when the child is not a group leader (always, from a script).
    pgid=$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ') || true
    [ -n "$pgid" ] || pgid=$pid
    echo "$pgid" >"$PIDS/$name"
}

# ---------------------------------------------------------------- configs

make_tls() {
    local d="$RUN/tls"
    mkdir -p "$d"
    (
        cd "$d"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
            -subj "/CN=fwagent test CA" -keyout ca.key -out ca.pem \
            -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -subj "/CN=localhost" -keyout server.key -out server.csr
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n' >ext.cnf
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
            -extfile ext.cnf -out server.pem
        chmod 644 ./*.pem ./*.key
    ) >"$d/openssl.log" 2>&1 || { cat "$d/openssl.log" >&2; die "openssl could not make the test certificates"; }
}

start_nginx() {
    local d="$RUN/nginx" user_line=""
    mkdir -p "$d/root" "$d/tmp"
    [ "$IS_ROOT" -eq 1 ] && user_line="user root root;"
    printf '%s:%s\n' "$HTTP_USER" "$(openssl passwd -apr1 "$HTTP_PASS")" >"$d/htpasswd"
    cat >"$d/nginx.conf" <<EOF
# generated by scripts/test-servers.sh
$user_line
worker_processes 1;
daemon off;
pid $d/nginx.pid;
error_log $d/error.log info;
events { worker_connections 512; }
http {
    default_type application/octet-stream;
    sendfile on;
    etag on;
    keepalive_timeout 30s;
    client_body_temp_path $d/tmp/client_body;
    proxy_temp_path $d/tmp/proxy;
    fastcgi_temp_path $d/tmp/fastcgi;
    uwsgi_temp_path $d/tmp/uwsgi;
    scgi_temp_path $d/tmp/scgi;
    # One JSON object per line, written as each request ends (no buffer): tests read it.
    log_format fwjson escape=json '{"time":"\$time_iso8601","method":"\$request_method",'
        '"request_uri":"\$request_uri","status":\$status,"bytes_sent":\$bytes_sent,'
        '"body_bytes_sent":\$body_bytes_sent,"range":"\$http_range","user":"\$remote_user",'
        '"connection":\$connection,"request_time":\$request_time,"port":\$server_port}';
    access_log $d/access.log fwjson;
    server {
        listen 127.0.0.1:$NGINX_PORT;
        listen 127.0.0.1:$NGINX_TLS_PORT ssl;
        ssl_certificate $RUN/tls/server.pem;
        ssl_certificate_key $RUN/tls/server.key;
        server_name localhost;
        root $d/root;
        location / { }
        location /slow/ { alias $d/root/; limit_rate 1m; }
        location /slow256k/ { alias $d/root/; limit_rate 256k; }
        location /slow2m/ { alias $d/root/; limit_rate 2m; }
        location /slow4m/ { alias $d/root/; limit_rate 4m; }
        location /slow8m/ { alias $d/root/; limit_rate 8m; }
        # Any rate: /rate/300k/NAME, /rate/16m/NAME (bytes per second, k and m suffixes).
        location ~ ^/rate/(?<rate>[0-9]+[km]?)/(?<file>.+)\$ {
            alias $d/root/\$file;
            limit_rate \$rate;
        }
        location /norange/ { alias $d/root/; max_ranges 0; }
        location /auth/ {
            alias $d/root/;
            auth_basic "fwagent test";
            auth_basic_user_file $d/htpasswd;
        }
        location /redirect/ { rewrite ^/redirect/(.*)\$ /\$1 redirect; }
        location = /status/403 { return 403; }
        location = /status/404 { return 404; }
        location = /status/500 { return 500; }
        location = /status/503 { return 503; }
    }
}
EOF
    nginx -p "$d/" -e "$d/error.log" -c "$d/nginx.conf" -t >"$d/configtest.log" 2>&1 ||
        { cat "$d/configtest.log" >&2; die "nginx rejected its config"; }
    spawn nginx "$d/stdout.log" nginx -p "$d/" -e "$d/error.log" -c "$d/nginx.conf"
}

start_pyftpd() {
    local d="$RUN/ftp"
    mkdir -p "$d/root"
    spawn pyftpd "$d/ftpd.log" "$PYTHON" "$ROOT/scripts/ftpserver.py" \
        --host 127.0.0.1 --port "$FTP_PORT" --root "$d/root" \
        --user "$FTP_USER" --password "$FTP_PASS" \
        --passive "$FTP_PASV_MIN-$((FTP_PASV_MIN + 31))"
}

start_vsftpd() {
    local d="$RUN/vsftpd" ftp_user=ftp extra=""
    mkdir -p "$d/root" "$d/empty"
    chmod 755 "$d/root"
    chmod 555 "$d/empty"
    id ftp >/dev/null 2>&1 || ftp_user=nobody
    [ "$IS_ROOT" -eq 1 ] || extra="run_as_launching_user=YES"
    cat >"$d/vsftpd.conf" <<EOF
# generated by scripts/test-servers.sh
listen=YES
listen_ipv6=NO
listen_address=127.0.0.1
listen_port=$VSFTPD_PORT
background=NO
anonymous_enable=YES
local_enable=NO
write_enable=NO
anon_upload_enable=NO
anon_mkdir_write_enable=NO
no_anon_password=YES
anon_root=$d/root
anon_world_readable_only=NO
ftp_username=$ftp_user
pasv_enable=YES
pasv_address=127.0.0.1
pasv_min_port=$VSFTPD_PASV_MIN
pasv_max_port=$((VSFTPD_PASV_MIN + 31))
port_enable=YES
connect_from_port_20=NO
secure_chroot_dir=$d/empty
seccomp_sandbox=NO
isolate_network=NO
tcp_wrappers=NO
use_sendfile=YES
xferlog_enable=YES
xferlog_std_format=NO
log_ftp_protocol=YES
vsftpd_log_file=$d/vsftpd.log
idle_session_timeout=600
data_connection_timeout=300
max_clients=200
max_per_ip=100
$extra
EOF
    spawn vsftpd "$d/stdout.log" vsftpd "$d/vsftpd.conf"
}

# Its command line, each word shell-quoted (tests run it with `bash -c "exec $CMD"`).
mosquitto_cmd() { printf '%q -c %q' "$(command -v mosquitto)" "$RUN/mosquitto/mosquitto.conf"; }

start_mosquitto() {
    local d="$RUN/mosquitto" user_line=""
    mkdir -p "$d"
    [ "$IS_ROOT" -eq 1 ] && user_line="user root"
    cat >"$d/mosquitto.conf" <<EOF
# generated by scripts/test-servers.sh
$user_line
pid_file $d/mosquitto.pid
persistence true
persistence_location $d/
persistence_file mosquitto.db
# Save after every change, so a SIGKILLed broker comes back with what it had.
autosave_on_changes true
autosave_interval 1
log_dest file $d/mosquitto.log
log_type error
log_type warning
log_type notice
log_type information
connection_messages true
log_timestamp_format %Y-%m-%dT%H:%M:%S
per_listener_settings false
allow_anonymous true
listener $MQTT_PORT 127.0.0.1
listener $MQTTS_PORT 127.0.0.1
cafile $RUN/tls/ca.pem
certfile $RUN/tls/server.pem
keyfile $RUN/tls/server.key
EOF
    spawn mosquitto "$d/stdout.log" "$(command -v mosquitto)" -c "$d/mosquitto.conf"
}

# ---------------------------------------------------------------- checks

check_servers() {
    local f=.fwagent-selftest tmp out
    tmp=$(mktemp -d)
    printf 'fwagent test server self-check 0123456789\n' >"$tmp/$f"
    cp "$tmp/$f" "$RUN/nginx/root/$f"
    cp "$tmp/$f" "$RUN/ftp/root/$f"
    cp "$tmp/$f" "$RUN/vsftpd/root/$f"
    local c=(curl -fsS --max-time 10 --noproxy '*')
    "${c[@]}" -o "$tmp/h" "http://127.0.0.1:$NGINX_PORT/$f" && cmp -s "$tmp/$f" "$tmp/h" ||
        die "nginx does not serve its docroot"
    out=$("${c[@]}" -r 8- "http://127.0.0.1:$NGINX_PORT/$f") && [ "$out" = "test server self-check 0123456789" ] ||
        die "nginx Range request gave '$out'"
    "${c[@]}" -u "$HTTP_USER:$HTTP_PASS" -o /dev/null "http://127.0.0.1:$NGINX_PORT/auth/$f" ||
        die "nginx /auth/ refuses $HTTP_USER"
    [ "$(curl -s --noproxy '*' -o /dev/null -w '%{http_code}' "http://127.0.0.1:$NGINX_PORT/auth/$f")" = 401 ] ||
        die "nginx /auth/ lets anonymous in"
    "${c[@]}" --cacert "$RUN/tls/ca.pem" -o /dev/null "https://127.0.0.1:$NGINX_TLS_PORT/$f" ||
        die "nginx TLS listener failed"
    "${c[@]}" -u "$FTP_USER:$FTP_PASS" -o "$tmp/p" "ftp://127.0.0.1:$FTP_PORT/$f" && cmp -s "$tmp/$f" "$tmp/p" ||
        die "pyftpdlib does not serve its root"
    "${c[@]}" -o "$tmp/v" "ftp://127.0.0.1:$VSFTPD_PORT/$f" && cmp -s "$tmp/$f" "$tmp/v" ||
        die "vsftpd does not serve its root anonymously"
    local m=(-h 127.0.0.1 -p "$MQTT_PORT" -t fwagent/selftest)
    mosquitto_pub "${m[@]}" -q 1 -r -m ok || die "mosquitto_pub failed"
    out=$(timeout 10 mosquitto_sub "${m[@]}" -C 1 -W 8) || true
    mosquitto_pub "${m[@]}" -q 1 -r -n || true # clear the retained message
    [ "$out" = ok ] || die "mosquitto publish/subscribe round trip failed (got '$out')"
    rm -f "$RUN/nginx/root/$f" "$RUN/ftp/root/$f" "$RUN/vsftpd/root/$f"
    : >"$RUN/nginx/access.log" # tests start from an empty access log
    rm -rf "$tmp"
}

# ---------------------------------------------------------------- env

write_env() {
    local tmp="$ENV_FILE.tmp"
    {
        echo "# generated by scripts/test-servers.sh start; source me"
        kv() { printf 'export %s=%q\n' "$1" "$2"; }
        kv FWAGENT_TEST_SERVERS_DIR "$RUN"
        kv FWAGENT_TEST_NGINX_PORT "$NGINX_PORT"
        kv FWAGENT_TEST_NGINX_URL "http://127.0.0.1:$NGINX_PORT"
        kv FWAGENT_TEST_NGINX_ROOT "$RUN/nginx/root"
        kv FWAGENT_TEST_NGINX_LOG "$RUN/nginx/access.log"
        kv FWAGENT_TEST_NGINX_ERROR_LOG "$RUN/nginx/error.log"
        kv FWAGENT_TEST_NGINX_AUTH_USER "$HTTP_USER"
        kv FWAGENT_TEST_NGINX_AUTH_PASS "$HTTP_PASS"
        kv FWAGENT_TEST_NGINX_TLS_PORT "$NGINX_TLS_PORT"
        kv FWAGENT_TEST_TLS_CA "$RUN/tls/ca.pem"
        kv FWAGENT_TEST_FTP_PORT "$FTP_PORT"
        kv FWAGENT_TEST_FTP_USER "$FTP_USER"
        kv FWAGENT_TEST_FTP_PASS "$FTP_PASS"
        kv FWAGENT_TEST_FTP_ROOT "$RUN/ftp/root"
        kv FWAGENT_TEST_FTP_LOG "$RUN/ftp/ftpd.log"
        kv FWAGENT_TEST_FTP_PASV_RANGE "$FTP_PASV_MIN-$((FTP_PASV_MIN + 31))"
        kv FWAGENT_TEST_VSFTPD_PORT "$VSFTPD_PORT"
        kv FWAGENT_TEST_VSFTPD_ROOT "$RUN/vsftpd/root"
        kv FWAGENT_TEST_VSFTPD_LOG "$RUN/vsftpd/vsftpd.log"
        kv FWAGENT_TEST_VSFTPD_PASV_RANGE "$VSFTPD_PASV_MIN-$((VSFTPD_PASV_MIN + 31))"
        kv FWAGENT_TEST_MQTT_PORT "$MQTT_PORT"
        kv FWAGENT_TEST_MQTT_URL "mqtt://127.0.0.1:$MQTT_PORT"
        kv FWAGENT_TEST_MQTTS_PORT "$MQTTS_PORT"
        kv FWAGENT_TEST_MOSQUITTO_CMD "$(mosquitto_cmd)"
        kv FWAGENT_TEST_MOSQUITTO_BIN "$(command -v mosquitto)"
        kv FWAGENT_TEST_MOSQUITTO_CONF "$RUN/mosquitto/mosquitto.conf"
        kv FWAGENT_TEST_MOSQUITTO_PIDFILE "$RUN/mosquitto/mosquitto.pid"
        kv FWAGENT_TEST_MOSQUITTO_LOG "$RUN/mosquitto/mosquitto.log"
        kv FWAGENT_TEST_MOSQUITTO_PUB "$(command -v mosquitto_pub)"
        kv FWAGENT_TEST_MOSQUITTO_SUB "$(command -v mosquitto_sub)"
    } >"$tmp"
    mv "$tmp" "$ENV_FILE"
}

# ---------------------------------------------------------------- stop

# kill_group NAME: TERM the process group recorded for NAME, KILL it after 5 s.
kill_group() {
    local f="$PIDS/$1" pgid i
    [ -f "$f" ] || return 0
    pgid=$(cat "$f")
    if [[ "$pgid" =~ ^[0-9]+$ ]] && [ "$pgid" -gt 1 ] && group_alive "$pgid"; then
        kill -TERM -- "-$pgid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            group_alive "$pgid" || break
            sleep 0.1
        done
        if group_alive "$pgid"; then
            log "$1 (group $pgid) ignored SIGTERM; killing"
            kill -KILL -- "-$pgid" 2>/dev/null || true
        fi
    fi
    rm -f "$f"
}

# Servers of this run directory that the pid files do not know: a mosquitto that a test
# restarted from FWAGENT_TEST_MOSQUITTO_CMD, or servers whose pid files were lost (a start
# that was killed half-way). Found by an argument naming one of this run directory's own
# config files or roots, so servers of other run directories are never touched.
kill_strays() {
    local marks=("$RUN/nginx/nginx.conf" "$RUN/vsftpd/vsftpd.conf" "$RUN/mosquitto/mosquitto.conf"
        "$RUN/ftp/root") pids=() c p pgid i line m
    # One grep over every command line first (cheap), then an exact look at the few hits.
    for c in $(grep -laF "$RUN/" /proc/[0-9]*/cmdline 2>/dev/null || true); do
        p=${c#/proc/}
        p=${p%/cmdline}
        [ "$p" != "$$" ] || continue
        case "$(basename "$(readlink "/proc/$p/exe" 2>/dev/null)")" in
            nginx | vsftpd | mosquitto | python*) ;;
            *) continue ;;
        esac
        # nginx rewrites its argv into one string: compare space-separated words.
        line=" $(tr '\0' ' ' 2>/dev/null <"$c") "
        for m in "${marks[@]}"; do
            if [[ "$line" == *" $m "* ]]; then
                pids+=("$p")
                break
            fi
        done
    done
    for p in "${pids[@]}"; do
        pid_alive "$p" || continue
        pgid=$(ps -o pgid= -p "$p" 2>/dev/null | tr -d ' ') || continue
        log "stopping stray $(tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline" | cut -c1-100) (pid $p)"
        if [ "$pgid" = "$p" ]; then kill -TERM -- "-$p" 2>/dev/null || true; else kill -TERM "$p" 2>/dev/null || true; fi
        for ((i = 0; i < 50; i++)); do pid_alive "$p" || break; sleep 0.1; done
        if pid_alive "$p"; then
            if [ "$pgid" = "$p" ]; then kill -KILL -- "-$p" 2>/dev/null || true; else kill -KILL "$p" 2>/dev/null || true; fi
        fi
    done
    rm -f "$RUN/mosquitto/mosquitto.pid"
}

do_stop() {
    [ -d "$RUN" ] || return 0
    rm -f "$ENV_FILE"
    local n
    for n in nginx pyftpd vsftpd mosquitto; do
        local t=$SECONDS
        kill_group "$n"
        [ "${FWAGENT_TEST_SERVERS_DEBUG:-}" = "" ] || log "$n stopped in $((SECONDS - t)) s"
    done
    kill_strays
    return 0
}

# ---------------------------------------------------------------- start

do_start() {
    local t0=$SECONDS
    mkdir -p "$RUN"
    do_stop
    # A clean slate every start: roots, logs, the mosquitto store.
    find "$RUN" -mindepth 1 -maxdepth 1 ! -name '*.log' -exec rm -rf {} +
    mkdir -p "$PIDS"
    install_missing
    local ports
    read -r NGINX_PORT NGINX_TLS_PORT FTP_PORT VSFTPD_PORT MQTT_PORT MQTTS_PORT FTP_PASV_MIN VSFTPD_PASV_MIN \
        <<<"$(pick_ports)"
    ports="nginx=$NGINX_PORT nginx-tls=$NGINX_TLS_PORT ftp=$FTP_PORT vsftpd=$VSFTPD_PORT mqtt=$MQTT_PORT mqtts=$MQTTS_PORT"
    # If anything below fails, leave nothing running.
    trap 'rc=$?; if [ $rc -ne 0 ]; then log "start failed; stopping what did start"; do_stop; fi' EXIT
    make_tls
    start_nginx
    start_pyftpd
    start_vsftpd
    start_mosquitto
    wait_port nginx "$NGINX_PORT" "$RUN/nginx/error.log"
    wait_port nginx "$NGINX_TLS_PORT" "$RUN/nginx/error.log"
    wait_port pyftpd "$FTP_PORT" "$RUN/ftp/ftpd.log"
    wait_port vsftpd "$VSFTPD_PORT" "$RUN/vsftpd/stdout.log"
    wait_port mosquitto "$MQTT_PORT" "$RUN/mosquitto/mosquitto.log"
    wait_port mosquitto "$MQTTS_PORT" "$RUN/mosquitto/mosquitto.log"
    check_servers
    write_env
    trap - EXIT
    log "up in $((SECONDS - t0)) s: $ports; env in $ENV_FILE"
}

do_status() {
    local n rc=0
    [ -f "$ENV_FILE" ] && cat "$ENV_FILE" || { log "not running (no $ENV_FILE)"; rc=1; }
    for n in nginx pyftpd vsftpd mosquitto; do
        if [ -f "$PIDS/$n" ] && group_alive "$(cat "$PIDS/$n")"; then
            log "$n: running (process group $(cat "$PIDS/$n"))"
        else
            log "$n: not running"
            rc=1
        fi
    done
    return "$rc"
}

do_logs() {
    local f
    for f in "$RUN"/nginx/error.log "$RUN"/ftp/ftpd.log "$RUN"/vsftpd/vsftpd.log \
        "$RUN"/vsftpd/stdout.log "$RUN"/mosquitto/mosquitto.log "$RUN"/mosquitto/stdout.log; do
        [ -s "$f" ] || continue
        printf -- '--- %s (last 20 lines)\n' "$f"
        tail -n 20 "$f"
    done
}

# start, stop and clean of one run directory one at a time (servers never inherit the lock).
lock_ops() {
    mkdir -p "$(dirname "$RUN")"
    exec 8>"$RUN.ops.lock"
    flock -w 120 8 || die "another test-servers.sh holds $RUN.ops.lock"
}

case "${1:-}" in
    start | stop | clean) lock_ops ;;
esac
case "${1:-}" in
    start) do_start ;;
    stop) do_stop; log "stopped" ;;
    status) do_status ;;
    logs) do_logs ;;
    clean) do_stop; rm -rf "$RUN"; log "removed $RUN" ;;
    *) echo "usage: $0 start|stop|status|logs|clean" >&2; exit 2 ;;
esac
