# Sourced by scripts/test and .ci/run: make sure the local Postgres and Redis the tests use are up.

ser_pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
ser_redis_up() { (exec 3<>/dev/tcp/127.0.0.1/6379 && printf 'PING\r\n' >&3 && head -c5 <&3 | grep -q PONG) 2>/dev/null; }

if ! ser_pg_up && command -v pg_ctlcluster >/dev/null 2>&1; then
    echo "[ser] starting PostgreSQL" >&2
    for version in $(ls /etc/postgresql 2>/dev/null); do
        pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    done
    for _ in $(seq 30); do ser_pg_up && break; sleep 1; done
fi
if ! ser_redis_up && command -v redis-server >/dev/null 2>&1; then
    echo "[ser] starting Redis" >&2
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
    for _ in $(seq 30); do ser_redis_up && break; sleep 1; done
fi
ser_pg_up || echo "[ser] warning: PostgreSQL is not answering on 127.0.0.1:5432" >&2
ser_redis_up || echo "[ser] warning: Redis is not answering on 127.0.0.1:6379" >&2
