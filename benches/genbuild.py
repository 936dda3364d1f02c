#!/usr/bin/env python3
"""Generates a C project of N tiny sources for the build benchmarks (scripts/bench-build).

Usage: genbuild.py DIR N

DIR/common.h is the header every source includes; DIR/src/dNNN/fNNNNN.c are the sources, 100 a
directory. Two equivalent builds of N compile edges each:
- DIR/build.ninja: `cc -c` of every source to obj/dNNN/fNNNNN.o, with gcc depfiles (deps =
  gcc), as CMake or Meson would write it;
- DIR/Cotfile: the same compiles as `cot run --bg` child thunks, a `cot wait` after every 16,
  so that the script does not start thousands of thunks at once.
"""
import os
import sys

root, n = sys.argv[1], int(sys.argv[2])
per_dir = 100
os.makedirs(root, exist_ok=True)
with open(os.path.join(root, "common.h"), "w") as f:
    f.write("#ifndef COMMON_H\n#define COMMON_H\n#define COMMON 42\nint common(void);\n#endif\n")

units = []
for i in range(n):
    d = "d%03d" % (i // per_dir)
    src = "src/%s/f%05d.c" % (d, i)
    obj = "obj/%s/f%05d.o" % (d, i)
    units.append((d, src, obj))
    os.makedirs(os.path.join(root, "src", d), exist_ok=True)
    with open(os.path.join(root, src), "w") as f:
        f.write('#include "common.h"\n\nint f%05d(int x) { return x * %d + COMMON; }\n' % (i, i))

with open(os.path.join(root, "build.ninja"), "w") as f:
    f.write("cflags = -O2 -I.\n\n")
    f.write("rule cc\n  command = cc -MD -MF $out.d $cflags -c $in -o $out\n"
            "  depfile = $out.d\n  deps = gcc\n  description = CC $out\n\n")
    for _, src, obj in units:
        f.write("build %s: cc %s\n" % (obj, src))

with open(os.path.join(root, "Cotfile"), "w") as f:
    f.write("#!/bin/sh\nset -e\n")
    dirs = sorted({d for d, _, _ in units})
    for k in range(0, len(dirs), 50):
        f.write("mkdir -p %s\n" % " ".join("obj/" + d for d in dirs[k:k + 50]))
    for k, (_, src, obj) in enumerate(units):
        f.write("cot run --bg -- cc -O2 -I. -c %s -o %s\n" % (src, obj))
        if k % 16 == 15:
            f.write("cot wait\n")
    f.write("cot wait\n")
os.chmod(os.path.join(root, "Cotfile"), 0o755)
