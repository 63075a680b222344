"""Collect vqa2-tiny's training photographs from Debian packages into one folder.

    python tools/training_photos.py OUT          # needs apt-get (Debian/Ubuntu) and dpkg-deb; ~330 MB download

The packages are fetched with `apt-get download` (no root, nothing installed) and unpacked with `dpkg-deb -x`
into a temporary folder; the files listed in PHOTOS are copied into OUT under the package's name, and
OUT/sources.txt records each package's version. None of these images is in the held-out set
(`tools/real_footage.py` uses scikit-image's photographs and OpenCV's sample videos).

Licences (each package's debian/copyright): mate-backgrounds GPL-2+ and CC-BY-SA-4.0, plasma-workspace-wallpapers
GPL-2+ (some LGPL/CC-BY-SA), ukui-wallpapers CC-BY-SA-3.0, opencv-doc's sample images Apache-2.0/BSD-3. The
photographs are used to train the model, not redistributed with it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# package -> files inside it: photographs first; a few illustrations stay as a minority of the content.
PHOTOS = {
    "mate-backgrounds": [f"usr/share/backgrounds/mate/nature/{name}.jpg" for name in (
        "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
        "TwoWings", "Wood", "YellowFlower")],
    "plasma-workspace-wallpapers": [f"usr/share/wallpapers/{name}/contents/images/{size}" for name, size in (
        ("BytheWater", "2560x1600.jpg"), ("ColdRipple", "2560x1600.jpg"), ("ColorfulCups", "2560x1600.jpg"),
        ("DarkestHour", "2560x1600.jpg"), ("EveningGlow", "2560x1600.jpg"), ("FallenLeaf", "2560x1600.jpg"),
        ("Grey", "2560x1600.jpg"), ("Kite", "2560x1600.jpg"), ("MilkyWay", "5120x2880.png"),
        ("OneStandsOut", "2560x1600.jpg"), ("Path", "2560x1600.jpg"), ("Volna", "5120x2880.jpg"),
        ("summer_1am", "2560x1600.jpg"), ("Autumn", "2560x1600.jpg"), ("SafeLanding", "5120x2880.jpg"),
        ("Altai", "5120x2880.png"))],
    "ukui-wallpapers": [f"usr/share/backgrounds/{name}" for name in ("goldfish.png", "string.jpg", "calla.png")],
    "opencv-doc": [f"usr/share/doc/opencv-doc/examples/data/{name}" for name in (
        "baboon.jpg", "building.jpg", "fruits.jpg", "home.jpg", "messi5.jpg", "aero1.jpg", "aero3.jpg", "apple.jpg",
        "orange.jpg", "butterfly.jpg", "graf1.png", "leuvenA.jpg", "smarties.png", "squirrel_cls.jpg")],
}


def fetch(package: str, into: Path) -> tuple[Path, str]:
    """Download and unpack `package`; returns (its root, its version)."""
    subprocess.run(["apt-get", "download", package], cwd=into, check=True, capture_output=True)
    deb = next(into.glob(f"{package}_*.deb"))
    root = into / package
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root, deb.name.split("_")[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to fill (created)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=False)
    versions = []
    with tempfile.TemporaryDirectory() as work:
        for package, files in PHOTOS.items():
            root, version = fetch(package, Path(work))
            versions.append(f"{package} {version}")
            (args.out / package).mkdir()
            for relative in files:
                source = root / relative
                if not source.is_file():
                    sys.exit(f"{package} {version} has no {relative}")
                name = source.name if package != "plasma-workspace-wallpapers" else f"{source.parts[-4]}{source.suffix}"
                shutil.copy2(source, args.out / package / name)
            print(f"{package} {version}: {len(files)} images", flush=True)
    (args.out / "sources.txt").write_text("\n".join(versions) + "\n")


if __name__ == "__main__":
    main()
