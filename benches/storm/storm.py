#!/usr/bin/env python3
"""Duplicate storm driver: KEYS keys x DUPS concurrent identical POST /payments,
spread (interleaved) over the given instances, on keep-alive HTTP/1.1
connections (asyncio, raw sockets, standard library only).

A 409 (the first request of the key still runs) or a connection error or a
5xx is retried on the same request until a 201 arrives (fresh, or a replay
with `Idempotent-Replayed: true`). Once --time-limit passes no new key is
started; the keys already started are finished (bounded by --grace).

Afterwards the handler executions are counted (see --count) and checked:
executions == keys started, one payment id per key, every duplicate got it.
Prints a JSON summary on stdout; exits 1 when a check fails.
"""
import argparse
import asyncio
import json
import random
import sys
import time


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--target", action="append", required=True,
                   help="host:port of an instance (repeat)")
    p.add_argument("--keys", type=int, default=10_000)
    p.add_argument("--dups", type=int, default=10)
    p.add_argument("--connections", type=int, default=128,
                   help="keep-alive connections in all (split over targets)")
    p.add_argument("--retry-cap", type=float, default=0.05,
                   help="longest sleep before retrying a 409 (s)")
    p.add_argument("--time-limit", type=float, default=120.0,
                   help="no new key starts after this many seconds")
    p.add_argument("--grace", type=float, default=60.0,
                   help="then the started keys get this long to finish")
    p.add_argument("--count", choices=["ledger", "table"], default="ledger",
                   help="ledger: sum GET /payments of every target; "
                        "table: rows of GET /payments (any target) with our currency")
    p.add_argument("--run-id", default="%08x" % random.getrandbits(32))
    return p.parse_args()


class Stats:
    def __init__(self):
        self.sent = 0            # every attempt, retries included
        self.fresh = 0           # final 201 without Idempotent-Replayed
        self.replays = 0         # final 201 with Idempotent-Replayed: true
        self.conflicts = 0       # 409s seen (each retried)
        self.other = {}          # other statuses seen (each retried)
        self.conn_errors = 0     # connection errors (each retried)
        self.e2e = []            # first send -> final 201, per request (s)
        self.final_attempt = []  # the final (successful) attempt alone (s)
        self.ids = {}            # key -> {payment id: count}
        self.unfinished = 0


async def read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = b""
    return status, headers, body


class Conn:
    def __init__(self, host, port):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def request(self, raw):
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(raw)
        await self.writer.drain()
        status, headers, body = await read_response(self.reader)
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def post(key, body):
    return (b"POST /payments HTTP/1.1\r\nHost: storm\r\nIdempotency-Key: " + key.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


async def worker(conn, queue, stats, args, hard_deadline):
    loop = asyncio.get_running_loop()
    while True:
        item = await queue.get()
        if item is None:
            return
        key, raw = item
        start = loop.time()
        while True:
            if loop.time() > hard_deadline:
                stats.unfinished += 1
                break
            t0 = loop.time()
            stats.sent += 1
            try:
                status, headers, body = await conn.request(raw)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                stats.conn_errors += 1
                conn.close()
                await asyncio.sleep(0.01)
                continue
            t1 = loop.time()
            if status == 201:
                if headers.get("idempotent-replayed", "").lower() == "true":
                    stats.replays += 1
                else:
                    stats.fresh += 1
                stats.e2e.append(t1 - start)
                stats.final_attempt.append(t1 - t0)
                pid = json.loads(body)["id"]
                per_key = stats.ids.setdefault(key, {})
                per_key[pid] = per_key.get(pid, 0) + 1
                break
            if status == 409:
                stats.conflicts += 1
            else:
                stats.other[status] = stats.other.get(status, 0) + 1
            try:
                wait = float(headers.get("retry-after", "0"))
            except ValueError:
                wait = 0.0
            await asyncio.sleep(min(max(wait, 0.0), args.retry_cap))
        queue.task_done()


async def http_get(host, port, path):
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 30)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: storm\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    status, _, body = await read_response(reader)
    writer.close()
    if status != 200:
        raise RuntimeError(f"GET {path} on {host}:{port}: {status} {body[:200]!r}")
    return json.loads(body)


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def main():
    args = parse_args()
    targets = [(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in args.target]
    currency = ("S" + args.run_id)[:16]
    stats = Stats()
    queues = [asyncio.Queue(maxsize=args.connections) for _ in targets]
    per_target = max(1, args.connections // len(targets))
    loop = asyncio.get_running_loop()
    t_start = loop.time()
    soft_deadline = t_start + args.time_limit
    hard_deadline = soft_deadline + args.grace
    workers = [asyncio.create_task(worker(Conn(h, p), q, stats, args, hard_deadline))
               for (h, p), q in zip(targets, queues) for _ in range(per_target)]
    keys_started = 0
    for k in range(args.keys):
        if loop.time() > soft_deadline:
            break
        key = f"storm-{args.run_id}-{k}"
        raw = post(key, json.dumps({"amount": k + 1, "currency": currency}).encode())
        keys_started += 1
        for d in range(args.dups):  # interleaved: duplicate d goes to target d % n
            await queues[d % len(targets)].put((key, raw))
    for q in queues:
        await q.join()
    elapsed = loop.time() - t_start
    for q in queues:
        for _ in range(per_target):
            q.put_nowait(None)
    await asyncio.gather(*workers)

    # Handler executions.
    if args.count == "ledger":
        listed = []
        for h, p in targets:
            listed += await http_get(h, p, "/payments")
        listed = [x for x in listed if x["currency"] == currency]
    else:
        listed = [x for x in await http_get(*targets[0], "/payments") if x["currency"] == currency]
    executions = len(listed)
    listed_ids = {x["id"] for x in listed}

    answered_ids = set()
    bad_keys = []
    for key, per_key in stats.ids.items():
        answered_ids |= set(per_key)
        if len(per_key) != 1 or sum(per_key.values()) != args.dups:
            bad_keys.append((key, per_key))
    requests = keys_started * args.dups
    ok = (executions == keys_started and len(stats.ids) == keys_started and not bad_keys
          and listed_ids == answered_ids and stats.fresh == keys_started
          and stats.unfinished == 0)
    ms = lambda x: None if x is None else round(x * 1000, 2)
    summary = {
        "run_id": args.run_id,
        "targets": args.target,
        "keys_requested": args.keys,
        "keys_started": keys_started,
        "dups": args.dups,
        "requests": requests,
        "attempts_sent": stats.sent,
        "elapsed_s": round(elapsed, 2),
        "rps": round(requests / elapsed, 1),
        "attempts_per_s": round(stats.sent / elapsed, 1),
        "fresh_201": stats.fresh,
        "replayed_201": stats.replays,
        "conflicts_409_retried": stats.conflicts,
        "other_status_retried": stats.other,
        "connection_errors_retried": stats.conn_errors,
        "unfinished_requests": stats.unfinished,
        "p50_ms": ms(pct(stats.e2e, 0.50)),
        "p99_ms": ms(pct(stats.e2e, 0.99)),
        "final_attempt_p50_ms": ms(pct(stats.final_attempt, 0.50)),
        "final_attempt_p99_ms": ms(pct(stats.final_attempt, 0.99)),
        "handler_executions": executions,
        "executions_equal_keys": executions == keys_started,
        "keys_with_split_or_missing_answers": len(bad_keys),
        "listed_ids_equal_answered_ids": listed_ids == answered_ids,
        "ok": ok,
    }
    print(json.dumps(summary))
    if bad_keys:
        print("split keys (first 5):", bad_keys[:5], file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
