#!/usr/bin/env bash
# On this (CPU) machine: download spconv's CUDA 12.6 wheels, cumm's and their pure-Python dependencies (Python 3.12,
# manylinux x86-64) for the GPU machine, pack them into one tar with its sha256 and split it into parts that fit
# beside the working tree in the 64 MiB a GPU run can carry:
#
#   .spconv/part_aa, .spconv/part_ab, ...   (22 MB each, the last one smaller)
#   .spconv/spconv_wheels.sha256            (sha256, total size and the parts with their sizes)
#
# Then send two parts (and the .sha256 file) per GPU run and run `bash scripts/gpu/spconv.sh stash` there, and
# `bash scripts/gpu/spconv.sh install` in the run that carries the last ones (scripts/gpu/spconv.sh says more).
#
#   bash scripts/gpu/prepare_spconv.sh
#   SPCONV_VERSION=2.3.8 CUMM_VERSION=0.8.2 bash scripts/gpu/prepare_spconv.sh
#
# Dependencies are followed recursively through each wheel's METADATA Requires-Dist (markers evaluated for CPython
# 3.12 on Linux x86-64, extras ignored) and downloaded with --no-deps; those the GPU machine already has (torch and
# its own dependencies, numpy, scipy, ninja, setuptools) are skipped. CUMM_VERSION defaults to 0.7.11, the newest
# cumm-cu126 inside spconv-cu126 2.3.8's pin `cumm-cu126>=0.7.11,<0.8.0` (0.8.x works on the CPU build here, but is
# outside the pin: the script warns when the chosen version does not satisfy a pin).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
SPCONV_VERSION=${SPCONV_VERSION:-2.3.8}
CUMM_VERSION=${CUMM_VERSION:-0.7.11}
CUDA_TAG=${CUDA_TAG:-cu126}
PART_SIZE=${PART_SIZE:-22MB}   # GNU split: MB = 1000*1000 bytes
PY=${PYTHON:-python3}

mkdir -p .git/info
grep -qx '/.spconv/' .git/info/exclude 2>/dev/null || echo '/.spconv/' >> .git/info/exclude

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/whl"

"$PY" - "$tmp/whl" "spconv-$CUDA_TAG==$SPCONV_VERSION" "cumm-$CUDA_TAG==$CUMM_VERSION" <<'EOF'
import re
import subprocess
import sys
import zipfile
from pathlib import Path

try:
    from packaging.markers import Marker  # noqa: F401
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # pip vendors it
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import Version

dest = Path(sys.argv[1])
roots = sys.argv[2:]
# already on the GPU machine (shared/device/README.md): torch with its own dependencies, numpy, scipy, ninja, ...
SKIP = {"torch", "numpy", "scipy", "sympy", "mpmath", "ninja", "setuptools", "pip", "wheel", "typing-extensions",
        "filelock", "jinja2", "markupsafe", "networkx", "fsspec", "triton", "pyyaml", "tqdm", "rich", "pillow"}
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "extra": ""}
PLAT = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none"]
for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
          "manylinux1_x86_64", "manylinux_2_5_x86_64", "any"):
    PLAT += ["--platform", p]


def wheel_of(name):
    key = canonicalize_name(name).replace("-", "_")
    for w in dest.glob("*.whl"):
        if canonicalize_name(w.name.split("-")[0]).replace("-", "_") == key:
            return w
    return None


def requires(whl):
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if re.match(r"[^/]+\.dist-info/METADATA$", n))
        text = z.read(meta).decode("utf-8", "replace")
    out = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            r = Requirement(line.split(":", 1)[1].strip())
            if r.marker is None or r.marker.evaluate(ENV):
                out.append(r)
    return out


got = {}  # canonical name -> (version, wheel)
pins = []  # (requirement, required by)
queue = [(Requirement(r), "(asked)") for r in roots]
while queue:
    req, by = queue.pop(0)
    name = canonicalize_name(req.name)
    pins.append((req, by))
    if name in SKIP or name in got:
        continue
    spec = f"{req.name}{req.specifier}"
    print(f"  {spec:<40} <- {by}", flush=True)
    res = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", *PLAT,
                          "-d", str(dest), spec], capture_output=True, text=True)
    whl = wheel_of(req.name)
    if res.returncode != 0 or whl is None:
        sys.exit(f"could not download a py3.12 x86-64 wheel of {spec}:\n{res.stderr}")
    version = whl.name.split("-")[1]
    got[name] = (version, whl)
    for r in requires(whl):
        queue.append((r, f"{req.name} {version}"))

bad = 0
for req, by in pins:
    name = canonicalize_name(req.name)
    if name in got and req.specifier and not req.specifier.contains(Version(got[name][0]), prereleases=True):
        print(f"WARNING: {req.name} {got[name][0]} does not satisfy {req} (required by {by}); installed with "
              "--no-deps anyway", flush=True)
        bad += 1
skipped = sorted({canonicalize_name(r.name) for r, _ in pins if canonicalize_name(r.name) in SKIP})
print(f"downloaded {len(got)} wheels; skipped (on the GPU machine already): {', '.join(skipped)}")
EOF

( cd "$tmp/whl" && sha256sum -- *.whl > SHA256SUMS )
tar -cf "$tmp/spconv_wheels.tar" -C "$tmp/whl" .
rm -rf .spconv
mkdir -p .spconv
split -b "$PART_SIZE" -a 2 "$tmp/spconv_wheels.tar" .spconv/part_
size=$(stat -c %s "$tmp/spconv_wheels.tar")
sum=$(sha256sum "$tmp/spconv_wheels.tar" | cut -d' ' -f1)
{
    echo "$sum  spconv_wheels.tar"
    echo "# size $size"
    for p in .spconv/part_*; do echo "# part $(basename "$p") $(stat -c %s "$p")"; done
} > .spconv/spconv_wheels.sha256

echo
echo "wheels:"
( cd "$tmp/whl" && ls -l --block-size=K -- *.whl | awk '{printf "  %8s  %s\n", $5, $9}' )
echo "tar: $size bytes, sha256 $sum"
echo "parts:"
for p in .spconv/part_*; do
    stat -c %s "$p" | awk -v p="$p" '{printf "  %-20s %10d bytes (%.1f MiB)\n", p, $1, $1 / 1048576}'
done
echo
echo "send along (carry) .spconv/spconv_wheels.sha256 and two parts per GPU run:"
parts=(.spconv/part_*)
for ((i = 0; i < ${#parts[@]}; i += 2)); do
    if ((i + 2 >= ${#parts[@]})); then cmd=install; else cmd=stash; fi
    list=".spconv/spconv_wheels.sha256"
    for p in "${parts[@]:i:2}"; do list+=", $p"; done
    echo "  carry [$list]  ->  bash scripts/gpu/spconv.sh $cmd"
done
