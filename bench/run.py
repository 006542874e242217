"""Benchmarks: amiforge's stages against the plain tools doing the same work, one run.

    .venv/bin/python bench/run.py [--recipe recipes/debian-12-minimal.yaml] [--skip-boot]

Prints a table and writes bench/results/<timestamp>.json. Figures are ratios measured in
the same run on the same machine; the machines are noisy, so compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builder.fsutil import allocated_bytes  # noqa: E402
from builder.plan import make_plan  # noqa: E402
from builder.recipe.load import load_recipe  # noqa: E402
from builder.vm import VirtualMachine  # noqa: E402


def timed(argv: list[str], **kwargs: object) -> float:
    started = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, **kwargs)
    return time.monotonic() - started


def mmdebstrap_alone(recipe: Path, work: Path) -> float:
    """mmdebstrap with the same package set and the same options amiforge passes."""
    plan = make_plan(load_recipe(recipe))
    os_plan = plan.os
    argv = ["mmdebstrap", "--mode=unshare", "--variant=minbase",
            f"--include={','.join(os_plan.packages)}",
            *(f"--dpkgopt={o}" for o in os_plan.dpkg_options),
            os_plan.release, str(work / "tree"), os_plan.mirror]
    return timed(argv)


def cold_build(recipe: Path, out: Path) -> tuple[float, dict]:
    seconds = timed([sys.executable, "-m", "builder", str(recipe), "--no-cache", "-o",
                     str(out)], cwd=ROOT)
    return seconds, json.loads((out / "build-manifest.json").read_text())


BUNDLE_SNIPPET = """
import sys
from pathlib import Path
from builder.bundle import BundleKeys, bundle_image
from builder.plan import make_plan
from builder.recipe.load import load_recipe
keys = Path(sys.argv[2])
plan = make_plan(load_recipe(Path(sys.argv[4])))
bundle_image(Path(sys.argv[1]), Path(sys.argv[3]), BundleKeys(
    keys / "user-cert.pem", keys / "user-key.pem", keys / "ec2-cert.pem", "123456789012"), plan)
"""


def make_keys(directory: Path) -> Path:
    for name in ("user", "ec2"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                        str(directory / f"{name}-key.pem"), "-out",
                        str(directory / f"{name}-cert.pem"), "-days", "30", "-subj",
                        f"/CN={name}"], check=True, capture_output=True)
    return directory


def bundle_vs_pipeline(image: Path, recipe: Path, work: Path) -> dict[str, float]:
    """amiforge's bundle against what ec2-bundle-image runs, on the same image."""
    keys = make_keys(work / "keys")
    ours, plain = work / "bundle-ours", work / "bundle-plain"
    plain.mkdir()
    started = time.monotonic()
    timing = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-c",
                             BUNDLE_SNIPPET, str(image), str(keys), str(ours), str(recipe)],
                            cwd=ROOT, check=True, capture_output=True, text=True)
    ours_s = time.monotonic() - started
    pipeline = (f"tar -c -S --owner 0 --group 0 -C {image.parent} -f - {image.name} | "
                "gzip -9 | openssl enc -e -aes-128-cbc -K 00112233445566778899aabbccddeeff "
                "-iv 00112233445566778899aabbccddeeff | split -b 10m - image.part.")
    plain_s = timed(["bash", "-o", "pipefail", "-c", pipeline], cwd=plain)
    ours_size = sum(p.stat().st_size for p in ours.glob("image.part.*"))
    plain_size = sum(p.stat().st_size for p in plain.glob("image.part.*"))
    return {"bundle_s": ours_s, "bundle_plain_pipeline_s": plain_s,
            "bundle_speedup": plain_s / ours_s, "bundle_mib": ours_size / 2**20,
            "bundle_plain_mib": plain_size / 2**20,
            "bundle_size_ratio": ours_size / plain_size,
            "bundle_peak_rss_mib": int(timing.stderr.strip().splitlines()[-1]) / 1024}


def boot_seconds(image: Path, firmware: str) -> float:
    with VirtualMachine(image, firmware) as vm:
        return vm.wait_for(timeout=300)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes/debian-12-minimal.yaml")
    parser.add_argument("--skip-boot", action="store_true")
    parser.add_argument("--skip-bundle", action="store_true")
    args = parser.parse_args()
    results: dict[str, object] = {"recipe": str(args.recipe)}
    with tempfile.TemporaryDirectory(prefix="amiforge-bench-") as tmp:
        work = Path(tmp)
        (work / "keys").mkdir()
        results["mmdebstrap_s"] = mmdebstrap_alone(args.recipe, work)
        subprocess.run(["rm", "-rf", str(work / "tree")], check=True)
        build_s, manifest = cold_build(args.recipe, work / "out")
        results["cold_build_s"] = build_s
        results["stages_s"] = manifest["timings"]
        results["cold_build_over_mmdebstrap"] = build_s / float(results["mmdebstrap_s"])
        raw, qcow2 = work / "out/disk.raw", work / "out/disk.qcow2"
        results["raw_allocated_mib"] = allocated_bytes(raw) / 2**20
        results["qcow2_mib"] = qcow2.stat().st_size / 2**20
        if not args.skip_bundle:
            results.update(bundle_vs_pipeline(raw, args.recipe, work))
        if not args.skip_boot:
            results["boot_bios_s"] = boot_seconds(raw, "bios")
            results["boot_uefi_s"] = boot_seconds(qcow2, "uefi")
    for key, value in results.items():
        shown = f"{value:.2f}" if isinstance(value, float) else value
        print(f"{key:<28} {shown}")
    out_dir = ROOT / "bench/results"
    out_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    (out_dir / f"{stamp}.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
