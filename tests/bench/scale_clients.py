"""Many monitored processes holding many TLS keep-alive connections at once, for
`gauge-bench scale` (tests/src/bench/scale.rs).

Usage: scale_clients.py PORT CA_FILE PROCESSES CONNECTIONS

Forks PROCESSES children from this one (ssl and http.client imported first, so the
pages are shared copy-on-write and 1,000 children stay cheap). Each child opens
CONNECTIONS HTTPS connections to 127.0.0.1:PORT and keeps them all open through
every phase, so PROCESSES x CONNECTIONS are open together:

  connect  every child opens its connections (TCP + TLS handshake);
  call1    one non-streamed chat completion on each connection;
  call2    a second one on each, on the same connections; then the children close
           them and exit.

After each phase this parent prints `<phase> <ok> <seconds>` (ok = connections
that succeeded, seconds from the start of the phase to the last child's report) and
waits for a line on stdin before starting the next, so the caller can look at the
agent while everything is open. End of stdin aborts. Children report on a pipe with
one fixed-size record per phase; a child that fails prints why on stderr and
reports the rest of its phases as failed.
"""
import ctypes
import http.client
import json
import os
import select
import signal
import ssl
import sys
import time

PHASES = ["connect", "call1", "call2"]
RECORD = 8  # b"P" + phase index + ok count (5 digits) + newline: atomic on a pipe


def body(phase, conn):
    # Distinct per call: 20 identical bodies from one process would be, rightly, a
    # loop to the agent's anomaly detector.
    content = "Say hi (%d/%d/%d)" % (os.getpid(), conn, phase)
    return json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}).encode()

HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}


def die_with_parent():
    # A child outliving this parent (killed by the bench's clean-up) would hold its
    # connections open forever.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def child(port, context, conns, go, report):
    die_with_parent()
    done = 0

    def send(phase, ok):
        os.write(report, b"P%d%05d\n" % (phase, ok))

    try:
        held = []
        for _ in range(conns):
            c = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=120)
            c.connect()
            held.append(c)
        send(0, len(held))
        done = 1
        for phase in (1, 2):
            os.read(go[phase], 1)  # EOF when the parent releases the phase
            ok = 0
            for i, c in enumerate(held):
                c.request("POST", "/v1/chat/completions", body=body(phase, i), headers=HEADERS)
                r = c.getresponse()
                r.read()
                ok += r.status == 200
            send(phase, ok)
            done = phase + 1
        # As a well-behaved client does: SSL_shutdown and SSL_free tell the agent
        # the connection ended (os._exit below runs no clean-up of its own).
        for c in held:
            c.close()
    except Exception as error:
        print("scale client %d: %s: %r" % (os.getpid(), PHASES[done], error), file=sys.stderr)
        for phase in range(done, len(PHASES)):
            send(phase, 0)
        os._exit(1)
    os._exit(0)


def main():
    port, ca, procs, conns = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    context = ssl.create_default_context(cafile=ca)
    # One "go" pipe per phase after connect: closing its write end releases every
    # child at once (they all read EOF).
    go = {phase: os.pipe() for phase in (1, 2)}
    report_r, report_w = os.pipe()
    children = []
    start = time.monotonic()
    for _ in range(procs):
        pid = os.fork()
        if pid == 0:
            os.close(report_r)
            for r, w in go.values():
                os.close(w)
            child(port, context, conns, {p: r for p, (r, _) in go.items()}, report_w)
        children.append(pid)
    os.close(report_w)
    counts = [0] * len(PHASES)
    oks = [0] * len(PHASES)
    pending = b""
    for phase, name in enumerate(PHASES):
        if phase > 0:
            if not sys.stdin.readline():
                sys.exit("scale_clients: stdin closed, aborting")
            start = time.monotonic()
            os.close(go[phase][1])
        while counts[phase] < procs:
            ready, _, _ = select.select([report_r], [], [], 300)
            if not ready:
                sys.exit("scale_clients: no report from the children in 300 s during %s" % name)
            chunk = os.read(report_r, 65536)
            if not chunk:
                sys.exit("scale_clients: every child exited before reporting %s" % name)
            pending += chunk
            while len(pending) >= RECORD:
                record, pending = pending[:RECORD], pending[RECORD:]
                p, ok = int(record[1:2]), int(record[2:7])
                counts[p] += 1
                oks[p] += ok
        print("%s %d %.3f" % (name, oks[phase], time.monotonic() - start), flush=True)
    failed = 0
    for pid in children:
        _, status = os.waitpid(pid, 0)
        failed += status != 0
    print("exited %d %d" % (procs - failed, failed), flush=True)


if __name__ == "__main__":
    main()
