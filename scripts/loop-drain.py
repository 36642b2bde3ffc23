#!/usr/bin/env python3
"""Runs tests/server/test_ops.py::test_sigterm_drains_inflight N times in one process while
HOGS busy-loop processes compete for the CPU; on a failure prints the exception, the server's
exit status and the tail of its stderr. Progress every 10 runs; the last line is the tally.

usage: .venv/bin/python scripts/loop-drain.py N HOGS   (KRS_BUILD_DIR picks the binary)"""
import multiprocessing
import os
import pathlib
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "server"))
import srv_helpers  # noqa: E402
import test_ops  # noqa: E402


def hog():
    while True:
        pass


def main():
    n, hogs = int(sys.argv[1]), int(sys.argv[2])
    started = []
    orig_init = srv_helpers.Server.__init__

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        started.append(self)
    test_ops.Server.__init__ = init
    procs = [multiprocessing.Process(target=hog, daemon=True) for _ in range(hogs)]
    for p in procs:
        p.start()
    fails, t0 = 0, time.time()
    try:
        for i in range(n):
            started.clear()
            try:
                test_ops.test_sigterm_drains_inflight()
            except BaseException as e:  # noqa: B036 - report everything, keep looping
                fails += 1
                print(f"run {i}: FAIL {type(e).__name__}: {e}", flush=True)
                traceback.print_exc()
                for s in started:
                    print("server rc", s.proc.poll(), "stderr:", "".join(s.stderr)[-3000:],
                          flush=True)
            if (i + 1) % 10 == 0:
                print(f"{i + 1} runs, {fails} failures, {time.time() - t0:.0f}s", flush=True)
    finally:
        for p in procs:
            p.terminate()
    print(f"DONE {n} runs, {fails} failures, {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
