"""Packaging: the wheel installs one top-level name, `lorabus`, mapped from the repository's folders."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_only_the_lorabus_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(ROOT)], check=True, timeout=300)
    (wheel,) = tmp_path.glob("lorabus-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    print("wheel top-level names:", sorted(top))
    assert {t for t in top if not t.endswith(".dist-info")} == {"lorabus"}, top
    for package in ("schemas", "worker", "scheduler", "kernels"):
        assert f"lorabus/{package}/__init__.py" in names
    assert "lorabus/worker/cli/__init__.py" in names and "lorabus/kernels/triton_ops.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "lorabus = lorabus.worker.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
