#!/usr/bin/env python3
"""scripts/bench's helpers: wait for and read the transcriber's figures from Postgres, turn the
raw results into the goal table, write it into docs/benchmarks.md, and remove a stage's
JetStream streams.

    bench_report.py wait-final DATABASE_URL TIMEOUT_SECS
    bench_report.py final-times DATABASE_URL
    bench_report.py table RESULTS_DIR
    bench_report.py json RESULTS_DIR
    bench_report.py write DOC TABLE_FILE
    bench_report.py delete-streams NATS_URL PREFIX
    bench_report.py sizes DATABASE_URL
    bench_report.py wait-compacted DATABASE_URL TIMEOUT_SECS
    bench_report.py lifecycle RESULTS_DIR
    bench_report.py seed-old DATABASE_URL CALLS PACKETS MINUTES_AGO

Only the standard library: psql for Postgres, a few lines of the NATS text protocol for the
JetStream API (no client library to install for a script).
"""

import json
import pathlib
import socket
import subprocess
import sys
import time

BEGIN = "<!-- bench:begin (written by scripts/bench; edit the script, not this table) -->"
END = "<!-- bench:end -->"


def psql(url, sql):
    out = subprocess.run(
        ["psql", "-X", "-q", "-t", "-A", "-F", "\t", url, "-v", "ON_ERROR_STOP=1", "-c", sql],
        check=True, capture_output=True, text=True,
    ).stdout
    return [line.split("\t") for line in out.splitlines() if line]


def wait_final(url, timeout):
    """Waits until no call is COMPLETED or PROCESSING_AI, then reports the drain rate from
    the calls' history: calls made final over the time from the first claim to the last."""
    deadline = time.monotonic() + float(timeout)
    while True:
        [[pending, total]] = psql(
            url,
            "SELECT count(*) FILTER (WHERE state IN ('COMPLETED', 'PROCESSING_AI')), count(*) FROM calls",
        )
        if int(pending) == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    [[final, first, last, archived, failed]] = psql(
        url,
        "SELECT count(DISTINCT call_id), extract(epoch FROM min(at)), extract(epoch FROM max(at)), "
        "count(*) FILTER (WHERE to_state = 'ARCHIVED'), count(*) FILTER (WHERE to_state = 'FAILED') "
        "FROM call_transitions WHERE to_state IN ('PROCESSING_AI', 'ARCHIVED', 'FAILED')",
    )
    span = float(last) - float(first) if first else 0.0
    finals = int(archived) + int(failed)
    return {
        "calls": int(total),
        "still_pending": int(pending),
        "archived": int(archived),
        "failed": int(failed),
        "seconds_first_claim_to_last_final": span,
        "calls_per_sec": finals / span if span > 0 else 0.0,
    }


def sizes(url):
    """Bytes on disk (tables, their TOAST and indexes; partitions summed into their parent) and
    what they hold: packets in either form and the call-minutes they make (3,000 packets of
    20 ms each)."""
    rows = psql(
        url,
        "SELECT COALESCE(p.relname, c.relname), sum(pg_total_relation_size(c.oid))::int8 "
        "FROM pg_class c LEFT JOIN pg_inherits i ON i.inhrelid = c.oid "
        "LEFT JOIN pg_class p ON p.oid = i.inhparent "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind = 'r' GROUP BY 1",
    )
    tables = {name: int(size) for name, size in rows}
    [[packet_rows, compacted, calls, final, database]] = psql(
        url,
        "SELECT (SELECT count(*) FROM packets), (SELECT COALESCE(sum(packets), 0) FROM call_audio), "
        "(SELECT count(*) FROM calls), "
        "(SELECT count(*) FROM calls WHERE state IN ('ARCHIVED', 'FAILED')), "
        "pg_database_size(current_database())",
    )
    stored = int(packet_rows) + int(compacted)
    return {
        "at": time.time(),
        "tables": tables,
        "packet_rows": int(packet_rows),
        "packets_compacted": int(compacted),
        "call_minutes": stored / 3000,
        "calls": int(calls),
        "final_calls": int(final),
        "database_bytes": int(database),
    }


def seed_old(url, calls, packets, minutes_ago):
    """Yesterday's data, for the sweeper to expire beside a load: CALLS final, uncompacted
    calls that began MINUTES_AGO (spread over ten minutes, in 60 s partitions made for them),
    each with PACKETS packet rows of 216 bytes and five history rows."""
    calls, packets, ago = int(calls), int(packets), int(minutes_ago)
    psql(
        url,
        "SELECT switchboard_add_partition(t, m, m + interval '60 s') FROM "
        f"generate_series(date_trunc('minute', now()) - interval '{ago} min', "
        f"date_trunc('minute', now()) - interval '{ago - 10} min', interval '60 s') AS m, "
        "unnest(ARRAY['packets', 'call_audio']) AS t",
    )
    psql(
        url,
        "INSERT INTO calls (call_id, state, version, created_at, packets_received, first_sequence, "
        "last_sequence, total_packets, transcript) "
        f"SELECT 'bench.old-' || i, 'ARCHIVED', 5, date_trunc('minute', now()) - interval '{ago} min' "
        f"+ (i % 600) * interval '1 s', {packets}, 0, {packets - 1}, {packets}, 'an old call' "
        f"FROM generate_series(1, {calls}) AS i",
    )
    psql(
        url,
        "INSERT INTO call_transitions (call_id, version, from_state, to_state, reason, event, published_at) "
        "SELECT c.call_id, v, NULL, 'ARCHIVED', 'ai_succeeded', '{}'::jsonb, now() "
        "FROM calls c, generate_series(1, 5) AS v WHERE c.call_id LIKE 'bench.old-%'",
    )
    psql(
        url,
        "INSERT INTO packets (call_id, sequence, data, sent_at, call_created_at) "
        "SELECT c.call_id, s, substr(repeat(md5(c.call_id || s), 7), 1, 216), s * 0.02, c.created_at "
        f"FROM calls c, generate_series(0, {packets - 1}) AS s WHERE c.call_id LIKE 'bench.old-%'",
    )
    return {"calls": calls, "packets": calls * packets, "minutes_ago": ago}


def wait_compacted(url, timeout):
    """Waits until every final call is compacted; reports how long that took from now."""
    started = time.monotonic()
    deadline = started + float(timeout)
    while True:
        [[left]] = psql(
            url,
            "SELECT count(*) FROM calls WHERE audio_compacted_at IS NULL "
            "AND state IN ('ARCHIVED', 'FAILED')",
        )
        if int(left) == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return {"uncompacted_final_calls": int(left), "seconds": time.monotonic() - started}


def lifecycle(results):
    """The figures of `scripts/bench lifecycle soak` as Markdown (pasted into
    docs/benchmarks.md, "Data lifecycle")."""
    d = pathlib.Path(results)
    def get(name):
        try:
            return json.loads((d / f"{name}.json").read_text())
        except (OSError, ValueError):
            return None

    out = []
    streaming, compacted = get("lifecycle_disk_streaming"), get("lifecycle_disk_compacted")
    if streaming and compacted:
        minutes = streaming["call_minutes"]
        packets = minutes * 3000
        rows = streaming["tables"]["packets"]
        record = compacted["tables"]["call_audio"]
        raw = packets * 216
        out += [
            "| form | bytes on disk | per packet | per call-minute |",
            "|---|---|---|---|",
            f"| the data as it arrived (216 B a packet) | {raw:,.0f} | 216 | {raw / minutes / 1e6:.2f} MB |",
            f"| packet rows while streaming (`packets`: heap, TOAST, index) | {rows:,} | {rows / packets:.0f} | {rows / minutes / 1e6:.2f} MB |",
            f"| compacted (`call_audio`) | {record:,} | {record / packets:.0f} | {record / minutes / 1e6:.3f} MB |",
            "",
            f"{minutes:.0f} call-minutes; compacted is {rows / record:.1f}x smaller than the rows and "
            f"{record / raw:.0%} of the data as it arrived.",
            "",
        ]
    runs = {r: get(f"lifecycle_ab_{r}") for r in ("off1", "on1", "off2", "on2")}
    if any(runs.values()):
        out += [
            "| run | compaction and sweeper | packets accepted | throughput | ingest p50 | p99 | calls final |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in runs.items():
            if not r:
                continue
            lat = r["ingest_latency"]
            rate = r["packets_accepted"] / r["duration_secs"] if r["duration_secs"] else 0
            finals = sum(r["final_states"].values())
            out.append(
                f"| {name} | {'on' if name.startswith('on') else 'off'} | {r['packets_accepted']:,} | "
                f"{rate:,.0f} /s | {lat.get('p50_ms', 0):.1f} ms | {lat.get('p99_ms', 0):.1f} ms | {finals:,} |"
            )
        out.append("")
    alone, beside = get("lifecycle_alone"), get("lifecycle_beside")
    if alone and beside:
        out += [
            "| ingest, 256 calls closed loop | throughput | p50 | p99 |",
            "|---|---|---|---|",
        ]
        for label, r in (("alone", alone), ("beside the backlog's compaction", beside)):
            lat = r["latency_ms"]
            out.append(f"| {label} | {r['throughput_per_sec']:,.0f} /s | {lat['p50']:.1f} ms | {lat['p99']:.1f} ms |")
        out.append("")
    soak = d / "soak_sizes.jsonl"
    if soak.exists():
        samples = [json.loads(line) for line in soak.read_text().splitlines() if line.strip()]
        if samples:
            t0 = samples[0]["at"]
            out += [
                "| minute | database | packets (rows) | call_audio | calls | packet rows live | calls kept |",
                "|---|---|---|---|---|---|---|",
            ]
            for s_ in samples[::2]:
                t = s_["tables"]
                out.append(
                    f"| {(s_['at'] - t0) / 60:.1f} | {s_['database_bytes'] / 1e6:.0f} MB | "
                    f"{t.get('packets', 0) / 1e6:.0f} MB | {t.get('call_audio', 0) / 1e6:.1f} MB | "
                    f"{t.get('calls', 0) / 1e6:.1f} MB | {s_['packet_rows']:,} | {s_['calls']:,} |"
                )
            out.append("")
    return "\n".join(out)


def final_times(url):
    """Completion-to-final time of every call, and the time from the first completion to the
    last final state (the whole burst)."""
    rows = psql(
        url,
        "WITH t AS (SELECT c.call_id, "
        " (SELECT min(at) FROM call_transitions WHERE call_id = c.call_id AND to_state = 'COMPLETED') AS done, "
        " (SELECT max(at) FROM call_transitions WHERE call_id = c.call_id AND to_state IN ('ARCHIVED', 'FAILED')) AS fin, "
        " c.state FROM calls c) "
        "SELECT count(*), count(fin), count(*) FILTER (WHERE state = 'FAILED'), "
        " percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM fin - done)), "
        " percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM fin - done)), "
        " extract(epoch FROM max(fin) - min(done)) FROM t",
    )
    [[calls, final, failed, p50, p99, span]] = rows
    num = lambda v: float(v) if v else None
    return {
        "calls": int(calls), "final": int(final), "failed": int(failed),
        "completion_to_final_p50_secs": num(p50), "completion_to_final_p99_secs": num(p99),
        "first_completion_to_last_final_secs": num(span),
    }


def load(results):
    out = {}
    for path in sorted(pathlib.Path(results).glob("*.json")):
        try:
            out[path.stem] = json.loads(path.read_text() or "null")
        except json.JSONDecodeError:
            out[path.stem] = None
        cmd = path.with_suffix(".cmd")
        if cmd.exists():
            out[path.stem + "_cmd"] = cmd.read_text().strip()
    return out


def fmt(value, unit="", digits=0):
    if value is None:
        return "not measured"
    return f"{value:,.{digits}f}{unit}"


def ratio(value, floor):
    if value is None or not floor:
        return "–"
    return f"{value / floor:.0%}"


def table(results):
    r = load(results)
    floors = r.get("floors") or {}
    pg = floors.get("postgres_unnest_rows_per_sec")
    js = floors.get("jetstream_pipelined_publishes_per_sec")
    pg1 = floors.get("postgres_single_row_commits_per_sec")
    # A packet is one row and one acknowledged publish: the lower of the two is its floor.
    packet_floor = min(x for x in (pg, js) if x) if (pg or js) else None
    get = lambda name, *keys: _dig(r.get(name), keys)
    clean = get("ingest_closed_256", "throughput_per_sec")
    lossy = get("ingest_lossy_256", "throughput_per_sec")
    rss_kb = get("ingest_memory", "VmHWM")
    drain = get("transcriber_drain", "calls_per_sec")
    burst = r.get("transcriber_burst_times") or {}
    fan = r.get("notifier_fanout") or {}
    cmd = lambda name: f"`{r.get(name + '_cmd', 'not run')}`"
    rows = [
        ("ingest, 256 connections, in sequence (closed loop)", "≥ 30,000 packets/s",
         f"{fmt(clean, ' /s')}, p99 {fmt(get('ingest_closed_256', 'latency_ms', 'p99'), ' ms', 1)}",
         f"{fmt(packet_floor, ' /s')} (lower of the two floors)", ratio(clean, packet_floor), cmd("ingest_closed_256")),
        ("ingest, 256 connections, open loop at 80% of the above", "p99 ≤ 10 ms",
         f"{fmt(get('ingest_open_256', 'throughput_per_sec'), ' /s')}, p99 {fmt(get('ingest_open_256', 'latency_ms', 'p99'), ' ms', 1)}",
         "–", "–", cmd("ingest_open_256")),
        ("ingest, 8 connections (closed loop)", "p99 ≤ 2 ms",
         f"{fmt(get('ingest_closed_8', 'throughput_per_sec'), ' /s')}, p99 {fmt(get('ingest_closed_8', 'latency_ms', 'p99'), ' ms', 2)}",
         "–", "–", cmd("ingest_closed_8")),
        ("ingest, 8 calls in real time (50 packets/s each, open loop)", "p99 ≤ 2 ms",
         f"{fmt(get('ingest_open_8', 'throughput_per_sec'), ' /s')}, p50 {fmt(get('ingest_open_8', 'latency_ms', 'p50'), ' ms', 2)}, p99 {fmt(get('ingest_open_8', 'latency_ms', 'p99'), ' ms', 2)}",
         "–", "–", cmd("ingest_open_8")),
        ("ingest, lossy calls (every other packet missing)", "≥ 80% of in sequence",
         f"{fmt(lossy, ' /s')} ({ratio(lossy, clean)} of in sequence)",
         f"{fmt(clean, ' /s')} (in sequence)", ratio(lossy, clean), cmd("ingest_lossy_256")),
        ("ingest memory under that load (peak resident)", "≤ 50 MB",
         fmt(rss_kb / 1024 if rss_kb else None, " MiB", 1), "–", "–", "`grep VmHWM /proc/PID/status`"),
        ("transcriber, AI latency 0, one replica", "≥ 2,000 calls/s",
         f"{fmt(drain, ' calls/s')} ({fmt(get('transcriber_drain', 'calls'))} calls)",
         f"{fmt(pg1 / 2 if pg1 else None, ' calls/s')} (single-row commits ÷ the 2 a call needs)",
         ratio(drain, pg1 / 2 if pg1 else None), cmd("transcriber_drain")),
        ("transcriber, default simulated AI, 1,000 calls at once", "all final within 60 s",
         f"{fmt(burst.get('final'))} final ({fmt(burst.get('failed'))} FAILED), last {fmt(burst.get('first_completion_to_last_final_secs'), ' s', 1)} after the first completion; "
         f"p50 {fmt(burst.get('completion_to_final_p50_secs'), ' s', 1)}, p99 {fmt(burst.get('completion_to_final_p99_secs'), ' s', 1)}",
         "–", "–", cmd("transcriber_burst")),
        (f"notifier, {fmt(fan.get('sockets'))} sockets, one event to all", "10,000 sockets, p99 ≤ 100 ms",
         f"{fmt(fan.get('delivered'))} of {fmt(fan.get('expected'))} delivered; p50 {fmt(_dig(fan, ('latency_ms', 'p50')), ' ms', 1)}, p99 {fmt(_dig(fan, ('latency_ms', 'p99')), ' ms', 1)}; "
         f"notifier peak resident {fmt((get('notifier_memory', 'VmHWM') or 0) / 1024 or None, ' MiB', 0)}",
         "–", "–", cmd("notifier_fanout")),
    ]
    lines = [
        BEGIN,
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `scripts/bench` on this machine "
        "(release build; Postgres, NATS, the services and the load generator all on the same two cores).",
        "",
        "| floor | measured | command |",
        "|---|---|---|",
        f"| Postgres, `INSERT … SELECT FROM UNNEST`, 1,000 rows a commit | {fmt(pg, ' rows/s')} | {cmd('floors')} |",
        f"| Postgres, one row a commit, {floors.get('postgres_single_row_commit_connections', '?')} connections | {fmt(pg1, ' commits/s')} | (same) |",
        f"| JetStream, 256 publishes in flight | {fmt(js, ' /s')} | (same) |",
        f"| JetStream, one publish at a time | {fmt(floors.get('jetstream_sequential_publishes_per_sec'), ' /s')} | (same) |",
        "",
        "| what | goal | measured | floor | ratio | command |",
        "|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", END]
    return "\n".join(lines)


def _dig(value, keys):
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def write(doc, table_file):
    text = pathlib.Path(doc).read_text()
    new = pathlib.Path(table_file).read_text().strip()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + new + tail
    else:
        text = text.rstrip() + "\n\n## The goal table (issue 11)\n\n" + new + "\n"
    pathlib.Path(doc).write_text(text)


def nats_request(sock, subject, payload=b""):
    """One request on the NATS text protocol; returns the reply's payload."""
    sock.sendall(b"PUB %s _INBOX.bench %d\r\n%s\r\n" % (subject.encode(), len(payload), payload))
    buf = b""
    while True:
        buf += sock.recv(65536)
        while b"\r\n" in buf:
            line, rest = buf.split(b"\r\n", 1)
            if line.startswith(b"PING"):
                sock.sendall(b"PONG\r\n")
                buf = rest
            elif line.startswith(b"MSG "):
                size = int(line.split()[-1])
                if len(rest) < size + 2:
                    break
                return json.loads(rest[:size])
            elif line.startswith(b"-ERR"):
                raise RuntimeError(line.decode())
            else:
                buf = rest


def delete_streams(url, prefix):
    """Deletes the streams whose names start with PREFIX (upper-cased, as Switchboard names them)."""
    host, port = url.split("://")[-1].split("@")[-1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.recv(4096)  # INFO
        sock.sendall(b'CONNECT {"verbose":false,"name":"scripts/bench"}\r\nSUB _INBOX.bench 1\r\n')
        names = nats_request(sock, "$JS.API.STREAM.NAMES", b"{}").get("streams") or []
        doomed = [n for n in names if n.startswith(prefix.upper() + "_")]
        for name in doomed:
            nats_request(sock, f"$JS.API.STREAM.DELETE.{name}")
    return doomed


def main(argv):
    cmd = argv[1] if len(argv) > 1 else ""
    if cmd == "wait-final":
        print(json.dumps(wait_final(argv[2], argv[3]), indent=2))
    elif cmd == "final-times":
        print(json.dumps(final_times(argv[2]), indent=2))
    elif cmd == "table":
        print(table(argv[2]))
    elif cmd == "json":
        print(json.dumps(load(argv[2]), indent=2))
    elif cmd == "write":
        write(argv[2], argv[3])
    elif cmd == "sizes":
        print(json.dumps(sizes(argv[2]), indent=2))
    elif cmd == "wait-compacted":
        print(json.dumps(wait_compacted(argv[2], argv[3]), indent=2))
    elif cmd == "seed-old":
        print(json.dumps(seed_old(*argv[2:6]), indent=2))
    elif cmd == "lifecycle":
        print(lifecycle(argv[2]))
    elif cmd == "delete-streams":
        print(" ".join(delete_streams(argv[2], argv[3])))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
