#!/usr/bin/env bash
# On the device: install into /tmp/site (put it first on PYTHONPATH) each wheel of the given folders whose
# package the image lacks or has in an older version. The device has no internet, so the wheels travel
# with the checkout, e.g. transformers >= 5.23 for Gemma GGUFs (docs/RESULTS.md, Gemma, session 6):
#   pip download --no-deps transformers==5.23.0 tokenizers==0.23.3 -d .device/tfwhl   # here, then carry it
#   bash benchmarks/device_site.sh .device/tfwhl .device/whl                         # there
set -euo pipefail
python3 - "$@" <<'PY'
import glob, subprocess, sys, importlib.metadata as md
from packaging.version import Version
folders, need = sys.argv[1:], set()
for whl in sorted(w for folder in folders for w in glob.glob(f"{folder}/*.whl")):
    name, version = whl.rsplit("/", 1)[-1].split("-")[:2]
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    print(f"{name}: image {have}, carried {version}")
    if have is None or Version(have) < Version(version):
        need.add(f"{name}=={version}")
print("installing", sorted(need) or "nothing")
if need:
    links = [arg for folder in folders for arg in ("--find-links", folder)]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *links,
                    "--target", "/tmp/site", *sorted(need)], check=True)
PY
