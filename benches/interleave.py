#!/usr/bin/env python3
"""Times several shell commands round-robin (A B C A B C ...), so that a machine whose speed
drifts (shared cores, frequency changes) slows every command alike, then prints the median wall
time of each in seconds, one per line. Usage: interleave.py ROUNDS PREPARE CMD...  PREPARE runs
(untimed) before every timed command."""
import statistics
import subprocess
import sys
import time

rounds, prepare, commands = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
times = [[] for _ in commands]
for _ in range(rounds):
    for i, command in enumerate(commands):
        subprocess.run(prepare, shell=True, check=True)
        start = time.monotonic()
        subprocess.run(command, shell=True, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times[i].append(time.monotonic() - start)
for series in times:
    print("%.3f" % statistics.median(series))
