#!/usr/bin/env bash
# A single-node Kafka 4.x (KRaft, broker+controller in one JVM) on 127.0.0.1, from Maven-fetched jars.
#
#   deploy/kafka/kafka.sh fetch    resolve the jars into .cache/kafka/jars (once; a stamp makes reruns instant)
#   deploy/kafka/kafka.sh format   format the data dir's storage if it is not formatted yet
#   deploy/kafka/kafka.sh up       fetch + format if needed, start in the background, wait until it answers
#   deploy/kafka/kafka.sh down     SIGTERM (controlled shutdown), SIGKILL after KAFKA_STOP_TIMEOUT seconds
#   deploy/kafka/kafka.sh status   exit 0 if running, 3 if not
#
# Environment: KAFKA_PORT (9092), KAFKA_CONTROLLER_PORT (port+1), KAFKA_DATA_DIR (.cache/kafka/run-<port>),
# KAFKA_HEAP (-Xmx512m), KAFKA_START_TIMEOUT (60 s), KAFKA_STOP_TIMEOUT (30 s), KAFKA_JARS_DIR, JAVA_HOME.
# Every command is idempotent. The data dir holds server.properties, kafka.pid, kafka.log (log4j2, WARN),
# kafka.out (the JVM's stdout/stderr) and kraft/ (the log dirs).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
POM="$ROOT/deploy/kafka/pom.xml"
JARS="${KAFKA_JARS_DIR:-$ROOT/.cache/kafka/jars}"
PORT="${KAFKA_PORT:-9092}"
CPORT="${KAFKA_CONTROLLER_PORT:-$((PORT + 1))}"
DATA="${KAFKA_DATA_DIR:-$ROOT/.cache/kafka/run-$PORT}"
HEAP="${KAFKA_HEAP:--Xmx512m}"
START_TIMEOUT="${KAFKA_START_TIMEOUT:-60}"
STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"
PYTHON="$ROOT/.venv/bin/python"

mkdir -p "$(dirname "$DATA")"
DATA="$(cd "$(dirname "$DATA")" && pwd)/$(basename "$DATA")"   # absolute: the JVM and the pid check need it
PIDFILE="$DATA/kafka.pid"
BOOTSTRAP="127.0.0.1:$PORT"

log() { echo "kafka.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found: $2"; }

# ---------------------------------------------------------------------------------------------- fetch
fetch() {
    local stamp="$JARS/.stamp" want
    want="$(sha256sum "$POM" | cut -d' ' -f1)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi
    need mvn "install Maven 3 (Debian: apt-get install maven); it fetches the broker's jars"
    mkdir -p "$(dirname "$JARS")"
    exec 8>"$(dirname "$JARS")/.fetch.lock"
    flock 8                                              # two fetches at once would race on the swap
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return 0; fi
    log "fetching Kafka jars with Maven into $JARS (once) ..."
    local tmp="$JARS.tmp.$$" t0=$SECONDS
    rm -rf "$tmp"
    mvn -q -B -f "$POM" dependency:copy-dependencies -DoutputDirectory="$tmp" -DincludeScope=runtime \
        >"$tmp.log" 2>&1 \
        || { cat "$tmp.log" >&2; rm -rf "$tmp" "$tmp.log"; die "Maven could not resolve the Kafka jars (network? proxy?); see above"; }
    rm -f "$tmp.log"
    # Without an SLF4J 2 backend the broker starts but logs nothing at all; refuse that set of jars.
    compgen -G "$tmp/log4j-slf4j2-impl-*.jar" >/dev/null && compgen -G "$tmp/slf4j-api-2.*.jar" >/dev/null \
        || { rm -rf "$tmp"; die "the resolved jars lack log4j-slf4j2-impl or slf4j-api 2.x; check $POM"; }
    rm -rf "$JARS"
    mv "$tmp" "$JARS"
    echo "$want" >"$stamp"
    log "fetched $(ls "$JARS"/*.jar | wc -l) jars in $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------------------------------------- config
java_opts() {
    # Serial GC: a small heap on a small shared machine; fewer GC threads to start and schedule.
    echo "$HEAP -XX:+UseSerialGC -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true" \
         "-Dlog4j2.configurationFile=file:$DATA/log4j2.properties -Dkafka.logs.dir=$DATA"
}

# Application class-data sharing: most of the broker's start-up is loading and verifying ~10k classes;
# an archive of them, dumped by the first broker that exits cleanly, makes later starts ~40 % faster.
# Keyed by the jars (names, sizes, mtimes: the JVM checks them) and the JVM build, the only ones it fits.
cds_archive() {
    local key
    key="$( { stat -c '%n %s %Y' "$JARS"/*.jar; "$JAVA" -version 2>&1; command -v "$JAVA"; } | sha256sum | cut -c1-12)"
    echo "$(dirname "$JARS")/cds/kafka-$key.jsa"
}

broker_opts() {
    local archive
    archive="$(cds_archive)"
    if [[ -s "$archive" ]]; then
        echo "$(java_opts) -XX:SharedArchiveFile=$archive"
    else
        echo "$(java_opts) -XX:ArchiveClassesAtExit=$DATA/kafka.jsa.tmp"
    fi
}

# After a clean exit, publish the archive the broker dumped (copy + rename: atomic, even across filesystems).
publish_cds() {
    local tmp="$DATA/kafka.jsa.tmp" archive
    [[ -s "$tmp" ]] || return 0
    archive="$(cds_archive)"
    if [[ ! -s "$archive" ]]; then
        mkdir -p "$(dirname "$archive")"
        cp "$tmp" "$archive.$$" && mv "$archive.$$" "$archive" && log "saved class-data archive $archive"
        find "$(dirname "$archive")" -name 'kafka-*.jsa' ! -name "$(basename "$archive")" -mmin +5 -delete 2>/dev/null || true
    fi
    rm -f "$tmp"
}

write_config() {
    mkdir -p "$DATA/kraft"
    cat >"$DATA/server.properties" <<EOF
# Written by deploy/kafka/kafka.sh on every start; edit the script, not this file.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$CPORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CPORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CPORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DATA/kraft
# One node: every internal topic must have replication factor 1 or groups never get a coordinator.
offsets.topic.replication.factor=1
# 50 partitions (the default) is for clusters; 8 makes the first group coordinator appear sooner.
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=8
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
# The project creates its topics (adaptwin.kafka.ensure_topics): a typo must fail, not create a topic.
auto.create.topics.enable=false
group.initial.rebalance.delay.ms=0
# Sized for a small shared machine.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
# The cleaner's dedupe buffer is 128 MiB of heap by default; 16 MiB is plenty for a few compacted topics.
log.cleaner.dedupe.buffer.size=16777216
# After a crash the controller refuses the restarted broker until the old broker session expires
# (default 9 s, which made every kill-and-restart 10 s slower); heartbeats are local, so 3 s is safe.
broker.session.timeout.ms=3000
broker.heartbeat.interval.ms=500
EOF
    cat >"$DATA/log4j2.properties" <<EOF
# WARN and above to a file; plus the start/stop lines so the log shows the broker's life.
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $DATA/kafka.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = FILE
logger.life.name = kafka.server.KafkaRaftServer
logger.life.level = INFO
logger.broker.name = kafka.server.BrokerServer
logger.broker.level = INFO
EOF
}

check_java() {
    need "$JAVA" "install a Java 17+ runtime (Debian: apt-get install openjdk-17-jre-headless) or set JAVA_HOME"
    local v
    v="$("$JAVA" -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)"
    [[ -n "$v" && "$v" -ge 17 ]] || die "Kafka 4 needs Java 17+, $JAVA is version ${v:-unknown}; set JAVA_HOME"
}

formatted() { [[ -f "$DATA/kraft/meta.properties" ]]; }

format() {
    check_java
    write_config
    formatted && return 0
    # A Kafka Uuid: 16 random bytes, URL-safe base64 without padding; Kafka never issues one starting with '-'.
    local cid
    until cid="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')" && [[ "$cid" != -* ]]; do :; done
    # shellcheck disable=SC2046
    "$JAVA" $(java_opts) -cp "$JARS/*" kafka.tools.StorageTool format --standalone \
        -t "$cid" -c "$DATA/server.properties" >"$DATA/format.out" 2>&1 \
        || { cat "$DATA/format.out" >&2; die "formatting $DATA/kraft failed (output above)"; }
    log "formatted $DATA/kraft (cluster $cid)"
}

# ---------------------------------------------------------------------------------------------- process
# Alive and not a zombie: a killed broker whose parent is gone may linger unreaped in a container.
alive() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ "${stat##*) }" != Z* ]]
}

# The pid file's process, if it is alive and is our broker (a recycled pid must never be signalled).
running_pid() {
    [[ -f "$PIDFILE" ]] || return 1
    local pid
    pid="$(cat "$PIDFILE" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid" || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "kafka.Kafka $DATA/server.properties" || return 1
    echo "$pid"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Up when the broker answers a metadata request (kafka-python, if the venv exists) or, without the venv,
# when its port accepts connections.
PY_CHECK=""
answers() {
    if [[ -z "$PY_CHECK" ]]; then
        PY_CHECK=no
        [[ -x "$PYTHON" ]] && "$PYTHON" -c 'import adaptwin.kafka' 2>/dev/null && PY_CHECK=yes
    fi
    if [[ "$PY_CHECK" == yes ]]; then
        "$PYTHON" -c 'import sys; from adaptwin.kafka import wait_for_broker; wait_for_broker(sys.argv[1], float(sys.argv[2]))' \
            "$BOOTSTRAP" "$1" >/dev/null 2>&1
    else
        port_open "$PORT"
    fi
}

lock_data() { mkdir -p "$DATA"; exec 9>"$DATA/.lock"; flock 9; }

up() {
    fetch
    lock_data
    local pid
    if pid="$(running_pid)"; then
        answers 10 || die "broker pid $pid is running but not answering on $BOOTSTRAP; see $DATA/kafka.log"
        log "already running (pid $pid) on $BOOTSTRAP"
        return 0
    fi
    for p in "$PORT" "$CPORT"; do
        port_open "$p" && die "port $p on 127.0.0.1 is taken by another process; stop it or set KAFKA_PORT/KAFKA_CONTROLLER_PORT"
    done
    format
    local t0
    t0="$(date +%s%N)"
    # shellcheck disable=SC2046
    # The broker must not inherit the lock fds, or it would hold the data dir's lock for its whole life.
    rm -f "$DATA/kafka.jsa.tmp"
    "$JAVA" $(broker_opts) -cp "$JARS/*" kafka.Kafka "$DATA/server.properties" \
        </dev/null >"$DATA/kafka.out" 2>&1 8>&- 9>&- &
    pid=$!
    echo "$pid" >"$PIDFILE"
    local deadline=$((SECONDS + START_TIMEOUT))
    until port_open "$PORT" && answers 5; do
        if ! alive "$pid"; then
            tail -n 20 "$DATA/kafka.out" "$DATA/kafka.log" >&2 2>/dev/null || true
            rm -f "$PIDFILE"
            die "the broker exited during start-up (log tails above; full logs in $DATA)"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 20 "$DATA/kafka.log" >&2 2>/dev/null || true
            die "the broker (pid $pid) did not answer on $BOOTSTRAP within ${START_TIMEOUT}s; see $DATA/kafka.log, stop it with: $0 down"
        fi
        sleep 0.2
    done
    local ms=$((($(date +%s%N) - t0) / 1000000))
    log "up (pid $pid) on $BOOTSTRAP in $((ms / 1000)).$((ms % 1000 / 100)) s; data in $DATA"
}

down() {
    lock_data
    local pid
    if ! pid="$(running_pid)"; then
        rm -f "$PIDFILE"
        log "not running ($DATA)"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_TIMEOUT)) clean=1
    while alive "$pid"; do
        if ((SECONDS >= deadline)); then
            log "no clean shutdown within ${STOP_TIMEOUT}s; killing pid $pid"
            kill -KILL "$pid" 2>/dev/null || true
            clean=0
        fi
        sleep 0.1
    done
    rm -f "$PIDFILE"
    if ((clean)); then publish_cds; else rm -f "$DATA/kafka.jsa.tmp"; fi
    log "stopped (pid $pid)"
}

status() {
    local pid
    if pid="$(running_pid)"; then
        echo "running pid=$pid bootstrap=$BOOTSTRAP data=$DATA"
    else
        echo "stopped bootstrap=$BOOTSTRAP data=$DATA"
        exit 3
    fi
}

case "${1:-}" in
    fetch) fetch ;;
    format) fetch; lock_data; format ;;
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 fetch|format|up|down|status  (env: KAFKA_PORT KAFKA_CONTROLLER_PORT KAFKA_DATA_DIR KAFKA_HEAP)" >&2
       exit 2 ;;
esac
