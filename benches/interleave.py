#!/usr/bin/env python3
"""Times several shell commands round-robin (A B C A B C ...), so that a machine whose speed
drifts (shared cores, frequency changes) slows every command alike, then prints the median wall
time of each in seconds, one per line. Usage: interleave.py [OPTIONS] ROUNDS PREPARE CMD...
PREPARE runs (untimed) before every timed command, with INTERLEAVE_INDEX set to the index (0,
1, ...) of the command about to run; an empty PREPARE runs nothing. A run that fails stops
everything, its stderr shown (with --keep-going: is reported and left out of the median).

Options (for short commands, where a shell's start-up would be part of what is measured):
  --ms             print milliseconds with two decimals instead of seconds
  --exec           run each command without a shell (split as a shell would, no expansion)
  --count PATTERN  after each median, the number of runs of that command whose stderr
                   contained PATTERN (e.g. which path a build took)
  --keep-going     go on after a run fails (a command that always fails still stops it)
"""
import os
import shlex
import statistics
import subprocess
import sys
import time

args = sys.argv[1:]
ms = use_exec = keep_going = False
pattern = None
while args and args[0].startswith("--"):
    option = args.pop(0)
    if option == "--ms":
        ms = True
    elif option == "--exec":
        use_exec = True
    elif option == "--keep-going":
        keep_going = True
    elif option == "--count":
        pattern = args.pop(0).encode()
    else:
        sys.exit("interleave.py: unknown option " + option)
rounds, prepare, commands = int(args[0]), args[1], args[2:]
times = [[] for _ in commands]
counts = [0 for _ in commands]
failed = [0 for _ in commands]
for _ in range(rounds):
    for i, command in enumerate(commands):
        if prepare:
            subprocess.run(prepare, shell=True, check=True,
                           env=dict(os.environ, INTERLEAVE_INDEX=str(i)))
        argv = shlex.split(command) if use_exec else command
        start = time.monotonic()
        done = subprocess.run(argv, shell=not use_exec, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
        times[i].append(time.monotonic() - start)
        if done.returncode != 0:
            sys.stderr.buffer.write(done.stderr[-4000:])
            sys.stderr.write("interleave.py: %r exited with %d\n" % (command, done.returncode))
            if not keep_going:
                sys.exit(1)
            times[i].pop()
            failed[i] += 1
            continue
        if pattern is not None and pattern in done.stderr:
            counts[i] += 1
for i, series in enumerate(times):
    if not series:
        sys.exit("interleave.py: %r failed every time" % commands[i])
    median = statistics.median(series)
    line = "%.2f" % (median * 1000) if ms else "%.3f" % median
    if pattern is not None:
        line += " %d" % counts[i]
    print(line)
