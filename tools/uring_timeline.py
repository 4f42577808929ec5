#!/usr/bin/env python3
"""Timeline of one walship ship from io_uring tracepoints (perf record -e io_uring:io_uring_submit_req
-e io_uring:io_uring_complete -e io_uring:io_uring_queue_async_work -e sched:sched_switch).

Usage: perf script -i perf.data | tools/uring_timeline.py RECV_PID
Pairs the receive loop's submissions with their completions by request and names them by opcode
(a RECV that returned more than 4 KiB is a frame body piece), and prints, over the streaming window (first to last data write): time-weighted ops in flight per
kind, the share of time with none in flight, durations (p50/p99), io-wq punts per opcode, and the
receive loop thread's off-CPU share."""
import re, sys, collections

KINDS = {"WRITE_FIXED": "write", "WRITE": "write", "FSYNC": "fsync", "RECV": "recv", "SENDMSG": "send", "SEND": "send"}
pid = sys.argv[1]
line_re = re.compile(r"^\s*(\S+)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)$")
ev = []
for line in sys.stdin:
    m = line_re.match(line)
    if not m:
        continue
    comm, tid, cpu, t, name, rest = m.groups()
    ev.append((float(t), tid, comm, name, rest))
ev.sort()
pending = collections.defaultdict(collections.deque)  # user_data -> submit times
intervals = collections.defaultdict(list)  # kind -> (start, end)
punts = collections.Counter()
off_cpu = 0.0
last_out = {}
loop_tid = pid
for t, tid, comm, name, rest in ev:
    if name == "io_uring:io_uring_submit_req" and tid == loop_tid:
        req = re.search(r"req (0x[0-9a-f]+)", rest).group(1)
        op = re.search(r"opcode (\S+),", rest).group(1)
        pending[req].append((t, op))
    elif name == "io_uring:io_uring_complete":
        req = re.search(r"req (0x[0-9a-f]+)", rest).group(1)
        res = int(re.search(r"result (-?\d+)", rest).group(1))
        if pending.get(req):
            s, op = pending[req].popleft()
            kind = KINDS.get(op, op.lower())
            if kind == "recv":
                kind = "recv_piece" if res > 4096 else "recv_small"
            intervals[kind].append((s, t))
    elif name == "io_uring:io_uring_queue_async_work":
        punts[re.search(r"opcode (\S+),", rest).group(1)] += 1
    elif name == "sched:sched_switch":
        prev = re.search(r"prev_pid=(\d+)", rest)
        nxt = re.search(r"next_pid=(\d+)", rest)
        if prev and prev.group(1) == loop_tid:
            last_out[loop_tid] = t
        if nxt and nxt.group(1) == loop_tid and loop_tid in last_out:
            last_out["span"] = last_out.get("span", []) + [(last_out.pop(loop_tid), t)]
writes = intervals.get("write", [])
if not writes:
    sys.exit("no receiver writes found (wrong pid?)")
t0, t1 = min(s for s, _ in writes), max(e for _, e in writes)
span = t1 - t0
print(f"streaming window: {span*1e3:.1f} ms ({len(writes)} writes)")

def in_window(iv):
    return [(max(s, t0), min(e, t1)) for s, e in iv if e > t0 and s < t1]

def none_share(iv):
    iv = sorted(in_window(iv))
    covered, cur_s, cur_e = 0.0, None, None
    for s, e in iv:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                covered += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        covered += cur_e - cur_s
    return 1 - covered / span

def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(p * len(v)))] if v else float("nan")

print(f"{'kind':<12} {'ops':>6} {'avg in flight':>13} {'none in flight':>14} {'p50 us':>8} {'p99 us':>8} {'max us':>8}")
for kind, iv in sorted(intervals.items()):
    w = in_window(iv)
    avg = sum(e - s for s, e in w) / span
    d = [(e - s) * 1e6 for s, e in iv]
    print(f"{kind:<12} {len(iv):>6} {avg:>13.2f} {none_share(iv)*100:>13.1f}% {pct(d,.5):>8.0f} {pct(d,.99):>8.0f} {max(d):>8.0f}")
print("io-wq punts:", dict(punts) or "none")
spans = [(max(s, t0), min(e, t1)) for s, e in last_out.get("span", []) if e > t0 and s < t1]
off = sum(e - s for s, e in spans)
print(f"receive loop thread off-CPU: {off/span*100:.1f}% of the window ({len(spans)} sleeps)")
