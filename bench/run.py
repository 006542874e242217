"""Benchmarks: amiforge's stages against the plain tools doing the same work, one run.

    .venv/bin/python bench/run.py [--recipe recipes/debian-13-minimal.yaml] [--only build,arm64]

Prints a table and writes bench/results/<timestamp>.json. Figures are ratios measured in
the same run on the same machine; the machines are noisy, so compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builder.host.fsutil import allocated_bytes  # noqa: E402
from builder.plan import make_plan  # noqa: E402
from builder.recipe.load import load_recipe  # noqa: E402
from builder.vm import VirtualMachine  # noqa: E402


def steal_seconds() -> float:
    """CPU time the hypervisor gave other machines so far (all CPUs; /proc/stat's steal).
    Printed beside the builds it overlapped: a ratio from a run with much of it is noise."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def timed(argv: list[str], **kwargs: object) -> float:
    """Wall time of one command, started once the previous one's writes are on disk (so a
    measurement does not pay for the writeback of the one before)."""
    os.sync()
    started = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, **kwargs)
    return time.monotonic() - started


def mmdebstrap_alone(recipe: Path, work: Path) -> float:
    """mmdebstrap with the same package set and the same options amiforge passes."""
    plan = make_plan(load_recipe(recipe))
    os_plan = plan.os
    components = " ".join(os_plan.components)
    argv = ["mmdebstrap", "--mode=unshare", "--variant=minbase",
            f"--include={','.join(os_plan.packages)}",
            *(f"--dpkgopt={o}" for o in os_plan.dpkg_options),
            os_plan.release, str(work / "tree"),
            *(f"deb {uri} {suite} {components}" for uri, suite in os_plan.sources)]
    return timed(argv)


def build(recipe: Path, out: Path, cache: Path) -> tuple[float, dict]:
    seconds = timed([sys.executable, "-m", "builder", str(recipe), "--cache-dir", str(cache),
                     "-o", str(out)], cwd=ROOT)
    return seconds, json.loads((out / "build-manifest.json").read_text())


def one_file_rebuild(work: Path, recipe_name: str, cache: Path) -> tuple[Path, float]:
    """A warm rebuild from the cache a cold build of RECIPE_NAME filled, with one file of
    the recipe changed (on a copy of the recipes). Returns the copied recipe, the seconds."""
    recipes = work / f"recipes-{Path(recipe_name).stem}"
    shutil.copytree(ROOT / "recipes", recipes)
    recipe = recipes / recipe_name
    build(recipe, work / "warm", cache)  # same inputs as the cold build: fills nothing new
    (recipes / "files/motd").write_text("changed for the benchmark\n")
    seconds, _ = build(recipe, work / "warm", cache)
    return recipe, seconds


def rebuilds(work: Path, cold_s: float, cache: Path) -> dict[str, float]:
    """Warm rebuilds of the default recipe: one file changed, then one package added."""
    recipe, one_file_s = one_file_rebuild(work, "debian-13-minimal.yaml", cache)
    recipe.write_text(recipe.read_text().replace("packages: [openssh-server]",
                                                 "packages: [openssh-server, less]"))
    package_s, _ = build(recipe, work / "warm", cache)
    return {"warm_one_file_s": one_file_s, "warm_one_file_over_cold": one_file_s / cold_s,
            "warm_add_package_s": package_s, "warm_add_package_over_cold": package_s / cold_s}


def arm64(work: Path, amd64_cold_s: float) -> dict[str, float]:
    """The Graviton recipe built on this x86_64 host (qemu-user) from an empty cache, as the
    amd64 cold build was; a warm one-file rebuild; its boot to the login prompt (TCG)."""
    cache = work / "cache-arm64"
    steal = steal_seconds()
    cold_s, manifest = build(ROOT / "recipes/debian-13-arm64.yaml", work / "out-arm64", cache)
    steal = steal_seconds() - steal
    _, one_file_s = one_file_rebuild(work, "debian-13-arm64.yaml", cache)
    with VirtualMachine(work / "out-arm64/disk.qcow2", "uefi", arch="arm64") as vm:
        boot_s = vm.wait_for(timeout=900)
    return {"arm64_cold_build_s": cold_s, "arm64_cold_build_steal_s": steal,
            "arm64_stages_s": manifest["timings"],
            "arm64_cold_over_amd64_cold": cold_s / amd64_cold_s,
            "arm64_warm_one_file_s": one_file_s,
            "arm64_warm_one_file_over_cold": one_file_s / cold_s, "arm64_boot_uefi_s": boot_s}


def compressed_qcow2_mib(raw: Path, work: Path) -> float:
    from builder.stages.convert import convert

    target = work / "compressed.qcow2"
    convert(raw, target, "qcow2", compress=True)
    return target.stat().st_size / 2**20


UPLOAD_SNIPPET = """
import os, sys, time
from pathlib import Path
os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
from builder.aws.session import Aws
from builder.aws.snapshots import upload_image
ebs = Aws(region="us-east-1", endpoint_url=sys.argv[2]).client("ebs")  # as build publish

def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

# moto imports its EC2/EBS backend on the first request (~1 s): not part of either run
warm_up = Path(sys.argv[1]).with_name("warm-up.raw")
warm_up.write_bytes(b"x" * (1 << 20))
upload_image(ebs, warm_up, description="warm-up", tags={}, workers=1)
# skip: an unencrypted publish with --skip-zero-blocks (non-zero blocks only), at 1 and 16
# workers; all: every block, as an encrypted publish (and the default) sends them
for mode, workers in (("skip", 1), ("skip", 16), ("all", 16)):
    server_cpu, own_cpu = cpu_seconds(sys.argv[3]), time.process_time()
    started = time.monotonic()
    _, stats = upload_image(ebs, Path(sys.argv[1]), description="bench", tags={},
                            workers=workers, skip_zero_blocks=mode == "skip")
    print(mode, workers, time.monotonic() - started, stats.blocks_sent, stats.blocks_zero,
          cpu_seconds(sys.argv[3]) - server_cpu, time.process_time() - own_cpu)
"""


@contextlib.contextmanager
def moto_server() -> Iterator[tuple[str, int]]:
    """moto in a process of its own, as a real endpoint would be: its URL and pid."""
    from builder.vm import free_port

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H",
                               "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(3)
        yield f"http://127.0.0.1:{port}", server.pid
    finally:
        server.terminate()
        server.wait()


def release(recipes: Path, out: Path, cache: Path, number: int, epoch: int) -> Path:
    """Release NUMBER of the default recipe (its name told apart by a variable)."""
    subprocess.run([sys.executable, "-m", "builder", str(recipes / "debian-13-minimal.yaml"),
                    "--cache-dir", str(cache), "-o", str(out), "--var", f"release={number}"],
                   cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "SOURCE_DATE_EPOCH": str(epoch)})
    return out


def delta_publish(work: Path, cache: Path) -> dict[str, float]:
    """A full publish of the default image against a delta publish of the next release
    with one file (the motd) changed: built the same day (same SOURCE_DATE_EPOCH), and a
    day later (every inode's ctime and the build date differ too). Blocks sent and time,
    to a local moto server (the default publish: every block, zeros included)."""
    recipes = work / "recipes-delta"
    shutil.copytree(ROOT / "recipes", recipes)
    recipe = recipes / "debian-13-minimal.yaml"
    recipe.write_text(recipe.read_text().replace("minimal-{{ build_date }}",
                                                 "minimal-{{ release }}-{{ build_date }}"))
    epoch = 1764547200
    first = release(recipes, work / "release-1", cache, 1, epoch)
    (recipes / "files/motd").write_text("release two: another message of the day\n")
    same_day = release(recipes, work / "release-2", cache, 2, epoch)
    next_day = release(recipes, work / "release-3", cache, 3, epoch + 86400)
    results: dict[str, float] = {}
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    with moto_server() as (url, _):
        for label, out, extra in (("full", first, []), ("delta_same_day", same_day,
                                  ["--parent", str(first)]),
                                  ("delta_next_day", next_day, ["--parent", str(first)])):
            seconds = timed([sys.executable, "-m", "builder", "publish", str(out),
                             "--region", "us-east-1", "--endpoint-url", url, *extra],
                            cwd=ROOT, env=env)
            record = next(iter(json.loads((out / "publish.json").read_text())
                               ["targets"].values()))
            results[f"publish_{label}_s"] = seconds
            results[f"publish_{label}_blocks"] = record["uploads"]["/dev/xvda"][
                "blocks_written"]
    for label in ("same_day", "next_day"):
        results[f"publish_delta_{label}_blocks_over_full"] = \
            results[f"publish_delta_{label}_blocks"] / results["publish_full_blocks"]
        results[f"publish_delta_{label}_time_over_full"] = \
            results[f"publish_delta_{label}_s"] / results["publish_full_s"]
    return results


def upload_speed(work: Path) -> dict[str, float]:
    """A 2 GiB image with 400 MiB of data in scattered regions to a local moto server."""
    image = work / "upload.raw"
    with open(image, "wb") as handle:
        handle.truncate(2 << 30)
        chunk = os.urandom(4 << 20)
        for i in range(100):
            handle.seek(i * (20 << 20))
            handle.write(chunk)
    with moto_server() as (url, pid):
        result = subprocess.run([sys.executable, "-c", UPLOAD_SNIPPET, str(image), url,
                                 str(pid)], cwd=ROOT, check=True, capture_output=True,
                                text=True)
    rows = {(r[0], int(r[1])): [float(x) for x in r[2:]] for r in
            (line.split() for line in result.stdout.splitlines())
            if r and r[0] in ("skip", "all")}
    one, many, every = rows["skip", 1], rows["skip", 16], rows["all", 16]
    # moto serves from one Python process: its CPU time at 16 workers is a floor for the
    # wall time whatever the client does; the ratio cannot go below floor / 1-worker time.
    return {"upload_skip_zero_1_worker_s": one[0], "upload_skip_zero_16_workers_s": many[0],
            "upload_16_over_1": many[0] / one[0], "upload_blocks_sent_skip_zero": int(many[1]),
            "upload_zero_blocks_skipped": int(many[2]),
            "upload_all_blocks_16_workers_s": every[0],
            "upload_blocks_sent_all": int(every[1]),
            "upload_all_over_skip_zero": every[0] / many[0],
            "upload_server_cpu_16_workers_s": many[3],
            "upload_16_over_1_floor_set_by_server": many[3] / one[0]}


BUNDLE_SNIPPET = """
import sys
from pathlib import Path
from builder.outputs.bundle import BundleKeys, bundle_image
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


SECTIONS = ("build", "rebuild", "bundle", "boot", "upload", "delta", "arm64")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes/debian-13-minimal.yaml")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections: {', '.join(SECTIONS)}")
    args = parser.parse_args()
    only = set(args.only.split(","))
    results: dict[str, object] = {"recipe": str(args.recipe)}
    with tempfile.TemporaryDirectory(prefix="amiforge-bench-") as tmp:
        work = Path(tmp)
        (work / "keys").mkdir()
        cache = work / "cache"  # empty: the cold build downloads, like mmdebstrap alone
        results["mmdebstrap_s"] = mmdebstrap_alone(args.recipe, work)
        subprocess.run(["rm", "-rf", str(work / "tree")], check=True)
        steal = steal_seconds()
        cold_s, manifest = build(args.recipe, work / "out", cache)
        results["cold_build_s"] = cold_s
        results["cold_build_steal_s"] = steal_seconds() - steal
        results["stages_s"] = manifest["timings"]
        results["cold_build_over_mmdebstrap"] = cold_s / float(results["mmdebstrap_s"])
        raw, qcow2 = work / "out/disk.raw", work / "out/disk.qcow2"
        results["raw_allocated_mib"] = allocated_bytes(raw) / 2**20
        results["qcow2_mib"] = qcow2.stat().st_size / 2**20
        results["qcow2_compressed_mib"] = compressed_qcow2_mib(raw, work)
        if "rebuild" in only:
            results.update(rebuilds(work, cold_s, cache))
        if "bundle" in only:
            results.update(bundle_vs_pipeline(raw, args.recipe, work))
        if "boot" in only:
            results["boot_bios_s"] = boot_seconds(raw, "bios")
            results["boot_uefi_s"] = boot_seconds(qcow2, "uefi")
        if "upload" in only:
            results.update(upload_speed(work))
        if "delta" in only:
            results.update(delta_publish(work, cache))
        if "arm64" in only:
            results.update(arm64(work, cold_s))
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
